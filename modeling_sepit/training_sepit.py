"""Reusable pieces of SEPIT's stage-by-stage training: freezing by module, per-module learning rates, parameter
counts of an upcycled model, an `SFTTrainer` that applies the per-module rates, and loss-curve plots.

Not imported by the model files, so a checkpoint's remote code never needs TRL.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from .modeling_moe import SepitSparseMoeBlock
from .processing_sepit import SepitProcessor

# Top-level parts of `SepitModel`, as named in a recipe's `freeze` list and in learning-rate scales.
MODULES = ("protein_model", "structure_module", "multi_modal_projector", "language_model")
ENCODER_MODULES = ("protein_model", "structure_module")


def _module_of(name: str) -> str:
    """'model.protein_model.encoder...' -> 'protein_model'; the LM head counts as part of the language model."""
    for part in name.split("."):
        if part in MODULES:
            return part
    return "language_model"


def freeze_modules(model: nn.Module, modules: Iterable[str]) -> None:
    """Stop gradients for whole SEPIT parts (e.g. the encoder in stage 2); names are checked against `MODULES`."""
    modules = set(modules)
    unknown = modules - set(MODULES)
    if unknown:
        raise ValueError(f"freeze: unknown modules {sorted(unknown)}; choose from {list(MODULES)}")
    for name, parameter in model.named_parameters():
        if _module_of(name) in modules:
            parameter.requires_grad_(False)


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
    encoder_lr_scale: float = 1.0,
    language_model_lr_scale: float = 1.0,
) -> list[dict]:
    """Optimizer groups: projector at `learning_rate`, encoder and LLM at a fraction of it (what the original
    configured but never applied); weight decay only on `decay_parameter_names` (the Trainer's choice)."""
    decay_parameter_names = set(decay_parameter_names)
    scales = {"protein_model": encoder_lr_scale, "structure_module": encoder_lr_scale}
    scales["language_model"] = language_model_lr_scale
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = scales.get(_module_of(name), 1.0)
        decay = name in decay_parameter_names
        groups.setdefault((scale, decay), []).append(parameter)
    return [
        {"params": params, "lr": learning_rate * scale, "weight_decay": weight_decay if decay else 0.0}
        for (scale, decay), params in sorted(groups.items())
    ]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and those a token activates: in each MoE block only `top_k` of the experts (the router is
    counted apart), so an upcycled top-1 model activates exactly what its dense parent had."""
    total = sum(p.numel() for p in model.parameters())
    inactive = router = 0
    for module in model.modules():
        if isinstance(module, SepitSparseMoeBlock):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            inactive += per_expert * (len(module.experts) - module.gate.top_k)
            router += module.gate.weight.numel()
    return {"total": total, "activated": total - inactive - router, "router": router}


STAGING_DIR = ".partial-checkpoints"


class AtomicCheckpointMixin:
    """For a `Trainer` subclass: each checkpoint is written under `<output_dir>/.partial-checkpoints/` and renamed into
    place by the main process once complete, so a run killed while saving leaves the previous checkpoint as the newest
    `checkpoint-N` (the one `resume_from_checkpoint=True` picks) instead of a half-written one.

    The Trainer writes checkpoints in place; every process of a sharded run writes into the same staging folder."""

    def _save_checkpoint(self, model: nn.Module, trial: object) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(run_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = run_dir + best[len(staging) :]
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


class SepitSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """`SFTTrainer` whose optimizer gives the encoder and the LLM their own learning-rate scale."""

    def __init__(self, *args, encoder_lr_scale: float = 1.0, language_model_lr_scale: float = 1.0, **kwargs):
        self.encoder_lr_scale = encoder_lr_scale
        self.language_model_lr_scale = language_model_lr_scale
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.model
            groups = parameter_groups(
                model,
                self.args.learning_rate,
                self.args.weight_decay,
                self.get_decay_parameter_names(model),
                self.encoder_lr_scale,
                self.language_model_lr_scale,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def configure_sft(training_args: SFTConfig, model: nn.Module) -> None:
    """The `SFTConfig` settings every SEPIT run needs: the collator reads the protein columns and builds the batches
    itself, and a dense model has no router logits for TRL's load-balancing loss."""
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if model.config.text_config.num_experts is None:
        training_args.router_aux_loss_coef = 0.0


def load_training_splits(
    dataset_name: str,
    dataset_config: str,
    train_split: str,
    test_split: str,
    max_train_samples: int | None,
    with_eval: bool,
) -> tuple[Dataset, Dataset | None]:
    """The training split (its first `max_train_samples` rows when given) and, when `with_eval`, the evaluation split
    of a SEPIT dataset; a missing split is a ValueError naming it and the splits there are."""
    dataset = load_dataset(dataset_name, dataset_config)
    for argument, split in (
        ("dataset_train_split", train_split),
        ("dataset_test_split", test_split if with_eval else None),
    ):
        if split is not None and split not in dataset:
            raise ValueError(f"{argument}: {dataset_name} has no split {split!r}; it has {list(dataset)}")
    train_dataset = dataset[train_split]
    if max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(max_train_samples, len(train_dataset))))
    return train_dataset, dataset[test_split] if with_eval else None


def llm_lengths(rows: dict[str, list], processor: SepitProcessor) -> list[int]:
    """LLM positions of each dataset row (a batch of `datasets.map`): its message tokens plus its protein's
    ceil((residues + 2) / protein_pooling) placeholders, for the Trainer's `group_by_length` sampler, whose batches of
    similar lengths pad little. The chat template's fixed tokens are left out: they shift every row alike."""
    texts = [" ".join(message["content"] for message in messages) for messages in rows["messages"]]
    text_tokens = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    sequences = rows.get("sequence") or [None] * len(texts)
    pooling = processor.protein_pooling
    protein_tokens = [
        0 if not sequence else -(-(min(len(sequence), processor.max_protein_length) + 2) // pooling)
        for sequence in sequences
    ]
    return [text + protein for text, protein in zip(text_tokens, protein_tokens, strict=True)]


def end_training(trainer: Trainer) -> None:
    """`trainer.end()` after letting go of the DDP wrapper. DDP's reducer holds the process group: freed last, at
    interpreter exit with the GIL held, Gloo's destructor can wait forever on a worker thread that needs the GIL to free
    a finished operation's tensors (pytorch/pytorch#56297; seen here as a hung `torchrun`). Released first, the group
    is destroyed by `destroy_process_group`, whose binding drops the GIL while it waits."""
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    trainer.end()


def save_loss_plot(log_history: list[dict], path: str | os.PathLike, title: str) -> Path | None:
    """A PNG of every logged loss series against the step (None when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for record in log_history:
        for key, value in record.items():
            if key.endswith("loss") and isinstance(value, int | float) and "step" in record:
                series.setdefault(key, []).append((record["step"], float(value)))
    if not series:
        return None
    path = Path(path)
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, points in sorted(series.items()):
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.legend()
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


__all__ = [
    "AtomicCheckpointMixin",
    "ENCODER_MODULES",
    "MODULES",
    "SepitSFTTrainer",
    "freeze_modules",
    "parameter_counts",
    "parameter_groups",
    "save_loss_plot",
]
