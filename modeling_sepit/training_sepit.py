"""Reusable pieces of SEPIT's stage-by-stage training: freezing by module, per-module learning rates, parameter
counts of an upcycled model, an `SFTTrainer` that applies the per-module rates, and loss-curve plots.

Not imported by the model files, so a checkpoint's remote code never needs TRL.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin
from datasets import Dataset, IterableDataset, load_dataset, load_dataset_builder
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import (
    AutoTokenizer,
    BatchEncoding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.trainer_pt_utils import get_module_class_from_name
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from .modeling_moe import SepitSparseMoeBlock, SepitTopKRouter, load_balancing_loss
from .modeling_structure import SepitStructureModule
from .processing_sepit import GENERATION_TAG, SepitDataCollator, SepitProcessor, split_protein_items, to_protein_input
from .pure_llm import BEGIN_PROTEIN, DEFAULT_MAX_LENGTH, END_PROTEIN, sequences_as_text

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


def check_lr_scale(name: str, scale: float) -> None:
    """A learning-rate scale is a finite number >= 0 (0: the part does not learn): a negative one would train the
    part uphill, silently."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (a fraction of the learning rate), got {scale!r}")


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
    check_lr_scale("encoder_lr_scale", encoder_lr_scale)
    check_lr_scale("language_model_lr_scale", language_model_lr_scale)
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


def _numel(parameter: nn.Parameter) -> int:
    """Elements of the whole parameter: under DeepSpeed ZeRO-3 a process holds only its partition (`ds_numel` is the
    whole); an FSDP2 `DTensor` reports its global size."""
    return getattr(parameter, "ds_numel", parameter.numel())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and those a token activates: in each MoE block only `top_k` of the experts (the router is
    counted apart), so an upcycled top-1 model activates exactly what its dense parent had."""
    total = sum(_numel(p) for p in model.parameters())
    inactive = router = 0
    for module in model.modules():
        if isinstance(module, SepitSparseMoeBlock):
            per_expert = sum(_numel(p) for p in module.experts[0].parameters())
            inactive += per_expert * (len(module.experts) - module.gate.top_k)
            router += _numel(module.gate.weight)
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


def launcher_engine() -> str | None:
    """The sharding engine `accelerate launch` set up from its config ('deepspeed' or 'fsdp'), None for DDP or no
    launcher: Accelerate passes it to the processes in its environment."""
    for engine in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() in ("1", "true", "yes"):
            return engine
    return None


def check_launch(training_args: TrainingArguments) -> None:
    """The processes train together, with the engine the launcher asked for, or the run stops with the fix: Accelerate
    never says when it falls back. On a machine without GPUs it joins the processes only with `use_cpu` (else each
    trains its own copy), drops DeepSpeed under `use_cpu` (plain DDP instead), and turns FSDP on only for GPU-type
    process groups (`use_fsdp_on_cpu` turns it on for CPU ones)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    engine = launcher_engine()
    if engine == "deepspeed" and training_args.use_cpu:
        raise ValueError(
            "use_cpu: Accelerate ignores DeepSpeed under use_cpu (the processes would train with plain DDP); set "
            "use_cpu: false, and on a machine without GPUs also ddp_backend: gloo with DS_ACCELERATOR=cpu"
        )
    if launched > 1 and training_args.world_size != launched:
        fix = "ddp_backend: gloo (and DS_ACCELERATOR=cpu)" if engine == "deepspeed" else "use_cpu: true"
        raise ValueError(
            f"{launched} processes were launched but Accelerate joined {training_args.world_size}: each would train "
            f"its own copy; on a machine without GPUs set {fix}"
        )
    if engine == "fsdp":
        use_fsdp_on_cpu()


def use_fsdp_on_cpu() -> bool:
    """Sets up Accelerate's shared state for FSDP when the launcher asked for it and the processes are CPU ones (True
    then). Accelerate 1.15 enables its FSDP plugin only over GPU-type process groups and otherwise trains with DDP,
    although FSDP2 (`fully_shard`) itself runs on CPU over gloo; the state is built as `Accelerator()` would build it
    for a GPU, with the plugin read from the launcher's environment, and the Trainer's `Accelerator` reuses it."""
    state = PartialState()
    if launcher_engine() != "fsdp" or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    accelerator_state = AcceleratorState(
        cpu=True, dynamo_plugin=TorchDynamoPlugin(), fsdp_plugin=plugin, _from_accelerator=True
    )
    accelerator_state.fsdp_plugin = plugin
    accelerator_state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


@contextmanager
def whole_model_loading(training_args: TrainingArguments) -> Iterator[None]:
    """Inside, every process loads whole models, as the DeepSpeed config's `zero3_init_flag: false` asks (DeepSpeed
    partitions them when the Trainer prepares the model): transformers otherwise builds every model under ZeRO-3 inside
    `deepspeed.zero.Init`, whatever the flag, and SEPIT's assembly from parts (a meta-device shell filled with loaded
    modules, resized embeddings, experts copied from the FFN) cannot work on empty partitions."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None or plugin.zero3_init_flag or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def give_every_parameter_a_gradient(model: FSDPModule) -> None:
    """FSDP2 reduce-scatters, unit by unit, the gradients that the unit's parameters received in this backward: a
    parameter that gets one on some processes and not on others (the structure module on a batch without structures,
    an expert no token chose) makes the processes' collectives differ (gloo: "Received data size doesn't match expected
    size"; NCCL: a hang). FSDP2's own switch makes every unit of `model` reduce-scatter a zero gradient for each
    trainable parameter left without one, in the backward only: the forward and the other gradients are unchanged."""
    model.set_reduce_scatter_unused_params(True)


# Modules whose inner calls depend on the data (the structure module returns early without coordinates; an MoE block
# calls only the experts its tokens chose): DeepSpeed ZeRO-3 gathers each as a whole ("leaf"), so that every process
# records the same module trace (else: "Detected a disagreement on list length between rank0 and rank1").
ZERO3_LEAF_MODULES = (SepitStructureModule, SepitSparseMoeBlock)


class ShardedTrainingMixin:
    """For a `Trainer` subclass, what SEPIT's models need under DeepSpeed ZeRO-3: the `ZERO3_LEAF_MODULES` gathered
    whole, and the structure module called on every batch (with an all-False `protein_coords_mask` when no protein of
    the batch has a structure, which computes what no coordinates compute), since ZeRO-3 requires every process to
    call the same modules in the same order. Under FSDP2:

    - the wrap list (`fsdp_transformer_layer_cls_to_wrap`) may name classes a stage's model lacks (stage 1 has no MoE
      block, stage 0 no LLM layer): one config serves every stage, and Accelerate would refuse the absent names;
    - every trainable parameter gets a gradient on every process (`give_every_parameter_a_gradient`);
    - the LM head, a unit of its own, is gathered before each forward: TRL's fused loss reads its weight directly;
    - the model saves as its own class: FSDP2 turns it into a generated subclass defined in torch, which
      `save_pretrained` would record in `auto_map`, copying torch's files in place of the model's code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unused_gradients_reduced = False
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        present = [cls for cls in ZERO3_LEAF_MODULES if any(isinstance(m, cls) for m in self.model.modules())]
        # Under ZeRO-3, a model with a structure module is given coordinates on every batch (all masked if none).
        self._always_structure = zero3 and SepitStructureModule in present
        if zero3 and present:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(self.model, present)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        names = getattr(plugin, "transformer_cls_names_to_wrap", None)
        if names:
            plugin.transformer_cls_names_to_wrap = [
                name for name in names if get_module_class_from_name(self.model, name) is not None
            ]

    def _before_forward(self, model: nn.Module, inputs: dict) -> None:
        if isinstance(model, FSDPModule):
            if not self._unused_gradients_reduced:  # once the Trainer has sharded the model
                give_every_parameter_a_gradient(model)
                self._unused_gradients_reduced = True
            head = model.get_output_embeddings()
            if isinstance(head, FSDPModule) and head is not model:
                # Accelerate shards the LM head as a unit of its own, gathered when the head is called; TRL's fused
                # loss reads its weight without calling it, and would get the shard (whose gradient then escapes
                # FSDP's averaging). Gathered here, as its forward would, its gradient is reduced with the others.
                head.unshard()
        if (
            self._always_structure
            and inputs.get("protein_input_ids") is not None
            and inputs.get("protein_coords") is None
        ):
            ids = inputs["protein_input_ids"]
            inputs["protein_coords"] = torch.zeros((*ids.shape, 3), device=ids.device)
            inputs["protein_coords_mask"] = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)

    def training_step(self, model, inputs, *args, **kwargs):
        self._before_forward(model, inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        self._before_forward(model, inputs)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model, generated = self.model, type(self.model)
        if isinstance(model, FSDPModule):
            model.__class__ = next(cls for cls in generated.__mro__ if not issubclass(cls, FSDPModule))
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__class__ = generated


LOSS_REDUCTIONS = ("token", "sequence")


class StructureDropoutEpochs(TrainerCallback):
    """Tells the collator which epoch begins, so that its structure drops are drawn anew at every visit; on resume
    the Trainer restores the epoch, so the draws are those of the uninterrupted run."""

    def __init__(self, collator: SepitDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.collator.set_epoch(int(state.epoch or 0))


class SepitSFTTrainer(ShardedTrainingMixin, AtomicCheckpointMixin, SFTTrainer):
    """`SFTTrainer` whose optimizer gives the encoder and the LLM their own learning-rate scale, with two of the
    original's training choices:

    - `loss_reduction`: "token" (TRL's: the mean over every answer token of the batch, so a one-word yes/no answer
      weighs ~20 times less than a 22-word one) or "sequence" (the original's: the mean over each sequence's answer
      tokens, then over sequences; computed on TRL's fused LM head outputs, never on full logits);
    - the MoE load-balancing loss per layer, summed over layers (`load_balancing_loss`), weighted by the model's
      `router_aux_loss_coef`, instead of TRL's, which pools all layers' router logits first.

    Checkpoints appear whole (`AtomicCheckpointMixin`); FSDP2 runs as `ShardedTrainingMixin` describes.
    """

    def __init__(
        self,
        *args,
        encoder_lr_scale: float = 1.0,
        language_model_lr_scale: float = 1.0,
        loss_reduction: str = "token",
        **kwargs,
    ):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.encoder_lr_scale = encoder_lr_scale
        self.language_model_lr_scale = language_model_lr_scale
        self.loss_reduction = loss_reduction
        super().__init__(*args, **kwargs)
        # TRL's pooled balancing loss is replaced by the per-layer one (with TRL's coefficient, which it read from
        # SFTConfig.router_aux_loss_coef or the model's config): routers are recorded by hooks during the forward.
        self.sepit_aux_loss_coef = self.router_aux_loss_coef if self.aux_loss_enabled else 0.0
        self.aux_loss_enabled = False
        text_config = self.model.config.get_text_config()
        if hasattr(text_config, "output_router_logits"):
            text_config.output_router_logits = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        routers = [module for module in model.modules() if isinstance(module, SepitTopKRouter)]
        router_logits: list[torch.Tensor] = []
        hooks = [
            router.register_forward_hook(lambda _module, _args, output: router_logits.append(output[0]))
            for router in (routers if self.sepit_aux_loss_coef else ())
        ]
        try:
            if self.loss_reduction == "token":
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:
                result = self._sequence_mean_loss(model, inputs, num_items_in_batch)
        finally:
            for hook in hooks:
                hook.remove()
        loss, outputs = result if isinstance(result, tuple) else (result, None)
        if router_logits:
            text_config = self.model.config.get_text_config()
            aux_loss = load_balancing_loss(
                tuple(router_logits), text_config.num_experts, text_config.num_experts_per_tok, inputs["attention_mask"]
            )
            # A per-micro-batch mean, as TRL's: with `num_items_in_batch` the Trainer leaves accumulation to the loss.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.sepit_aux_loss_coef * aux_loss / steps
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss

    def _sequence_mean_loss(self, model, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """Mean over sequences of each sequence's mean answer-token loss, from TRL's fused LM head (log-probabilities
        of the labels, zero where ignored). Micro-batches are averaged (the original trained one sequence per
        device), and DDP averages devices."""
        outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
        counts = outputs.label_mask.sum(-1)
        per_sequence = -outputs.log_probs.sum(-1) / counts.clamp(min=1)
        present = (counts > 0).to(per_sequence.dtype)
        loss = (per_sequence * present).sum() / present.sum().clamp(min=1)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:  # the Trainer will not divide
            loss = loss / self.current_gradient_accumulation_steps
        mode = "train" if self.model.training else "eval"
        valid = self.accelerator.gather_for_metrics(counts.sum()).sum()
        correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        return loss

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


@torch.no_grad()
def expert_load(model: nn.Module, collator: SepitDataCollator, rows: Dataset, batch_size: int) -> list[list[float]]:
    """Per MoE layer, the fraction of the (unpadded) tokens' top-k assignments each expert receives over `rows`
    (batched by `collator`): a router that learned nothing, or collapsed, shows here (1 / num_experts each is
    perfectly balanced)."""
    batches = (
        collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        for start in range(0, len(rows), batch_size)
    )
    routers = [module for module in model.modules() if isinstance(module, SepitTopKRouter)]
    counts = [torch.zeros(router.weight.shape[0]) for router in routers]
    mask: list[torch.Tensor] = []

    def count(layer: int):
        def hook(_module, _args, output) -> None:
            chosen = output[2][mask[0].reshape(-1).bool()].flatten().cpu()
            counts[layer] += torch.bincount(chosen, minlength=len(counts[layer])).float()

        return hook

    hooks = [router.register_forward_hook(count(layer)) for layer, router in enumerate(routers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {key: value.to(model.device) for key, value in batch.items() if key != "labels"}
            mask[:] = [batch["attention_mask"]]
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [(layer / layer.sum().clamp(min=1)).tolist() for layer in counts]


def configure_sft(training_args: SFTConfig, model: nn.Module) -> None:
    """The `SFTConfig` settings every SEPIT run needs: the collator reads the protein columns and builds the batches
    itself, and a dense model has no router logits for TRL's load-balancing loss."""
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if model.config.text_config.num_experts is None:
        training_args.router_aux_loss_coef = 0.0


def take_chat_template_path(training_args: SFTConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """TRL's `chat_template_path`, with TRL's meaning (a `.jinja`/`.j2` file, or a tokenizer folder or Hub id whose
    template to use: the LLM's own, e.g. SmolLM2's ChatML), read here and cleared from `training_args`: `SFTTrainer`
    would clone the source tokenizer's special tokens into the processing class, which a `SepitProcessor` cannot
    take, so the special tokens the template writes must already be `tokenizer`'s. None when the option is unset."""
    path = training_args.chat_template_path
    if path is None:
        return None
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        template = Path(path).read_text(encoding="utf-8")
    else:
        try:
            source = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"chat_template_path: {path} is neither a .jinja/.j2 file nor a tokenizer folder or Hub id ({error})"
            ) from error
        template = source.chat_template
        if not isinstance(template, str):
            raise ValueError(f"chat_template_path: {path}'s tokenizer has no single chat template; give a .jinja file")
        known = (None, tokenizer.unk_token_id)
        missing = sorted(
            token.content
            for token in source.added_tokens_decoder.values()
            if token.special and token.content in template and tokenizer.convert_tokens_to_ids(token.content) in known
        )
        if missing:
            raise ValueError(
                f"chat_template_path: {path}'s template writes {missing}, which the LLM's tokenizer lacks; take the "
                "template of the LLM's own tokenizer, or a .jinja file written with its tokens"
            )
    if not template.strip():
        raise ValueError(f"chat_template_path: {path} holds an empty template")
    training_args.chat_template_path = None
    return template


# Rows a streamed training split holds in memory to shuffle (`IterableDataset.shuffle`): an approximate shuffle whose
# memory is bounded by this, not by the dataset.
DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000
# The training scripts' `streaming` and `shuffle_buffer_size` arguments.
STREAMING_HELP = (
    "Read the dataset's Parquet files as training goes (an IterableDataset) instead of converting them to an Arrow "
    "copy first. Rows come in the files' order (train_sampling_strategy: sequential) or shuffled in a buffer "
    "(random); group_by_length is refused. Memory stays at one row group plus the shuffle buffer."
)
SHUFFLE_BUFFER_HELP = "With streaming and random sampling: rows held in memory to shuffle (the approximation's window)."


class SizedIterableDataset(IterableDataset):
    """A streamed split that knows its row count (read from its Parquet footers), so that the Trainer runs epochs as on
    an in-memory split: `num_train_epochs` works without `max_steps`, `StructureDropoutEpochs` sees each epoch, the
    stream is reshuffled at each (`set_epoch`), and a resumed run skips the batches of its epoch, not of the first.

    It reports one shard: over several processes Accelerate then gives each process every W-th batch of the one stream
    (`IterableDatasetShard`: the same rows as the in-memory path's `BatchSamplerShard`, the same number of batches on
    every process, each reading the whole stream and collating only its own batches). Sharded by files instead, the
    processes would get different row counts, and the first to run out would leave the others waiting in DDP forever.
    """

    num_rows: int

    def __len__(self) -> int:
        return self.num_rows

    @property
    def n_shards(self) -> int:  # what Accelerate reads to decide between sharding by files and by batches
        return 1


@functools.lru_cache(maxsize=64)
def parquet_footer(file: str) -> pq.FileMetaData:
    """A Parquet file's footer, read once per process: the stream reads one row group per call, and parsing a
    1,000-group footer each time made reading a group take 39 ms instead of 30 (measured, means of 20 reads)."""
    with fsspec.open(file, "rb") as handle:
        return pq.ParquetFile(handle).metadata


def parquet_row_groups(files: Iterable[str]) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of each row group in `files`, read from their Parquet footers only (local paths or fsspec
    URLs such as `hf://`)."""
    groups = []
    for file in map(str, files):
        if not file.endswith(".parquet"):
            raise ValueError(
                f"streaming: {file} is not a Parquet file; streaming reads Parquet data files (the layout "
                "dataset_card.build_dataset writes); leave streaming off to load this dataset into memory"
            )
        metadata = parquet_footer(file)
        groups += [(file, group, metadata.row_group(group).num_rows) for group in range(metadata.num_row_groups)]
    return groups


def read_row_groups(pieces: Sequence[tuple[str, int]]) -> Iterator[dict]:
    """The rows of Parquet row groups as dicts, one group at a time and without pre-buffering, so memory stays at one
    group's. datasets' own streamed Parquet reader (`as_streaming_dataset`, datasets 5.2 / pyarrow 26) kept Arrow memory
    growing with every row read (benchmarks/README.md, streaming section); this reader stays flat."""
    for file, group in pieces:
        with fsspec.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle, pre_buffer=False, metadata=parquet_footer(file))
            yield from parquet.read_row_group(group).to_pylist()


def streaming_options(training_args: TrainingArguments, streaming: bool, shuffle_buffer_size: int) -> dict:
    """`load_training_splits`'s streaming arguments from the Trainer's (empty without `streaming`), and batches read by
    every process itself (Accelerate would otherwise read them all on process 0 and concatenate batches of different
    lengths). `train_sampling_strategy` 'random' shuffles in a buffer with `data_seed` (else `seed`), 'sequential'
    keeps the files' order; length grouping needs every row's length before the first step, which a stream does not
    have: a ValueError. With `dataloader_drop_last` the stream is cut to whole global batches, as the in-memory
    sampler drops its last partial batch (the Trainer passes `drop_last` to map-style datasets only)."""
    if not streaming:
        return {}
    strategy = training_args.train_sampling_strategy
    if strategy not in ("random", "sequential"):
        raise ValueError(
            f"train_sampling_strategy: {strategy!r} needs every row's length before training, which a streamed "
            "dataset does not have; use random (a buffer shuffle, see shuffle_buffer_size) or sequential (the files' "
            "order) with streaming, or turn streaming off"
        )
    if shuffle_buffer_size < 1:
        raise ValueError(f"shuffle_buffer_size must be >= 1 (rows held to shuffle), got {shuffle_buffer_size}")
    training_args.accelerator_config.dispatch_batches = False
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    return {
        "streaming": True,
        "shuffle_seed": seed if strategy == "random" else None,
        "shuffle_buffer_size": shuffle_buffer_size,
        "whole_batches_of": training_args.train_batch_size * training_args.world_size
        if training_args.dataloader_drop_last
        else None,
    }


def load_training_splits(
    dataset_name: str,
    dataset_config: str,
    train_split: str,
    test_split: str,
    max_train_samples: int | None,
    with_eval: bool,
    streaming: bool = False,
    shuffle_seed: int | None = None,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
    whole_batches_of: int | None = None,
) -> tuple[Dataset | SizedIterableDataset, Dataset | SizedIterableDataset | None]:
    """The training split (its first `max_train_samples` rows when given) and, when `with_eval`, the evaluation split
    of a SEPIT dataset; a missing split is a ValueError naming it and the splits there are.

    `streaming`: both splits are read from their Parquet files as the Trainer goes (`SizedIterableDataset`; the
    shuffle holds `shuffle_buffer_size` rows), the training split shuffled in a buffer with `shuffle_seed` (None: in the
    files' order, the in-memory split's order under `train_sampling_strategy: sequential`), and cut to a multiple of
    `whole_batches_of` rows when given (`streaming_options` sets these from the Trainer's arguments)."""
    if not streaming:
        dataset = load_dataset(dataset_name, dataset_config)
        splits = list(dataset)
    else:
        builder = load_dataset_builder(dataset_name, dataset_config)
        splits = list(builder.config.data_files or {})
    for argument, split in (
        ("dataset_train_split", train_split),
        ("dataset_test_split", test_split if with_eval else None),
    ):
        if split is not None and split not in splits:
            raise ValueError(f"{argument}: {dataset_name} has no split {split!r}; it has {splits}")
    if not streaming:
        train_dataset = dataset[train_split]
        if max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(max_train_samples, len(train_dataset))))
        return train_dataset, dataset[test_split] if with_eval else None

    def stream(split: str, limit: int | None, seed: int | None, cut_to: int | None) -> SizedIterableDataset:
        groups = parquet_row_groups(builder.config.data_files[split])
        rows = sum(count for _, _, count in groups)
        # One shard per row group, as datasets' reader numbers them: a buffer shuffle also shuffles their order.
        streamed = IterableDataset.from_generator(
            read_row_groups,
            features=builder.as_streaming_dataset(split=split).features,  # the card's, else the first footer's schema
            gen_kwargs={"pieces": [(file, group) for file, group, _ in groups]},
            split=split,
        )
        if limit is not None and limit < rows:
            streamed, rows = streamed.take(limit), limit
        if seed is not None:
            streamed = streamed.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        if cut_to is not None and rows % cut_to:
            rows -= rows % cut_to
            streamed = streamed.take(rows)  # after the shuffle: a different partial batch left out at each epoch
        streamed.__class__ = SizedIterableDataset  # the same stream, with its length
        streamed.num_rows = rows
        return streamed

    train_dataset = stream(train_split, max_train_samples, shuffle_seed, whole_batches_of)
    return train_dataset, stream(test_split, None, None, None) if with_eval else None


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


class SequenceAsTextCollator:
    """Training batches of the PureLLM baseline (`pure_llm`) from the rows SEPIT trains on: the same chat template,
    each `<protein>` written as `<bop>SEQUENCE<eop>`, right-padded, labels on the assistant turns only.

    A sequence is cut at `max_protein_length` residues, as SEPIT's processor cuts it, and further in a conversation
    that would still exceed `max_length` tokens (the original's 2048), so that the answer fits whole. Only an answer
    too long even without its protein is cut at `max_length` (its tail), as the original truncated conversations."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_protein_length: int = 1022,
        max_length: int | None = DEFAULT_MAX_LENGTH,
    ):
        if isinstance(max_protein_length, bool) or not isinstance(max_protein_length, int) or max_protein_length < 1:
            raise ValueError(f"max_protein_length must be an integer >= 1, got {max_protein_length!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (text tokens per conversation) or None, got {max_length}")
        markers = tokenizer.convert_tokens_to_ids([BEGIN_PROTEIN, END_PROTEIN])
        if None in markers or tokenizer.unk_token_id in markers:
            raise ValueError(f"tokenizer: no {BEGIN_PROTEIN}/{END_PROTEIN} tokens; prepare it with prepare_pure_llm")
        if not GENERATION_TAG.search(tokenizer.chat_template or ""):
            raise ValueError(
                "tokenizer.chat_template: training batches need `{% generation %}` around assistant replies to place "
                "labels; prepare the tokenizer with prepare_pure_llm (SEPIT's template has them)"
            )
        self.tokenizer = tokenizer
        self.max_protein_length = max_protein_length
        self.max_length = max_length

    def _conversation(self, example: dict, where: str) -> tuple[list[dict], list[str]]:
        """An example's messages and its proteins' sequences, cut: protein items in the messages, a `proteins` list,
        or a dataset row's `sequence` column (SepitDataCollator's inputs)."""
        messages, proteins = split_protein_items(example.get("messages"), f"{where}.messages")
        if not proteins:
            proteins = example.get("proteins") or ([example["sequence"]] if example.get("sequence") else [])
        sequences = [
            to_protein_input(protein, f"{where}.proteins[{k}]").sequence[: self.max_protein_length]
            for k, protein in enumerate(proteins)
        ]
        return messages, sequences

    def _encode(self, conversations: list[list[dict]], sequences: list[list[str]], **kwargs) -> BatchEncoding:
        written = [
            sequences_as_text(messages, cut, f"examples[{i}].messages")
            for i, (messages, cut) in enumerate(zip(conversations, sequences, strict=True))
        ]
        return self.tokenizer.apply_chat_template(written, tokenize=True, return_dict=True, **kwargs)

    def _fit(self, messages: list[dict], sequences: list[str], length: int) -> list[str]:
        """`sequences` cut so that the conversation (`length` tokens with them) fits in `max_length`: the longest
        loses a residue per excess token until it fits, or until none is left (then the answer's tail goes too)."""
        sequences = list(sequences)
        while length > self.max_length and any(sequences):
            longest = max(range(len(sequences)), key=lambda k: len(sequences[k]))
            sequences[longest] = sequences[longest][: max(0, len(sequences[longest]) - (length - self.max_length))]
            length = len(self._encode([messages], [sequences])["input_ids"][0])
        if length > self.max_length:
            warnings.warn(
                f"a conversation over max_length={self.max_length} tokens even without its protein sequence: its "
                "answer is cut there, as the original truncated its conversations",
                stacklevel=3,
            )
        return sequences

    def lengths(self, rows: dict[str, list]) -> list[int]:
        """Text tokens of each dataset row (a batch of `datasets.map`), for the Trainer's `group_by_length` sampler."""
        examples = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
        parsed = [self._conversation(row, f"rows[{i}]") for i, row in enumerate(examples)]
        encoded = self._encode([messages for messages, _ in parsed], [cut for _, cut in parsed])
        counts = [len(ids) for ids in encoded["input_ids"]]
        return [min(count, self.max_length or count) for count in counts]

    def __call__(self, examples: Sequence[dict]) -> BatchEncoding:
        conversations, sequences = [], []
        for i, example in enumerate(examples):
            messages, cut = self._conversation(example, f"examples[{i}]")
            conversations.append(messages)
            sequences.append(cut)
        options = {"return_assistant_tokens_mask": True, "padding": True, "tokenizer_kwargs": {"padding_side": "right"}}
        batch = self._encode(conversations, sequences, **options)
        lengths = [sum(mask) for mask in batch["attention_mask"]]
        if self.max_length is not None and max(lengths) > self.max_length:
            for i, length in enumerate(lengths):
                if length > self.max_length:
                    sequences[i] = self._fit(conversations[i], sequences[i], length)
            batch = self._encode(conversations, sequences, truncation=True, max_length=self.max_length, **options)
        batch = batch.convert_to_tensors("pt")
        assistant = batch.pop("assistant_masks").bool() & batch["attention_mask"].bool()
        empty = (~assistant.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"examples{empty}: no assistant reply to train on (every label would be -100); each training "
                "conversation needs an assistant message with text"
            )
        batch["labels"] = batch["input_ids"].masked_fill(~assistant, -100)
        return batch


def end_training(trainer: Trainer) -> None:
    """`trainer.end()` after letting go of the DDP wrapper. DDP's reducer holds the process group: freed last, at
    interpreter exit with the GIL held, Gloo's destructor can wait forever on a worker thread that needs the GIL to free
    a finished operation's tensors (pytorch/pytorch#56297; seen here as a hung `torchrun`). Released first, the group
    is destroyed by `destroy_process_group`, whose binding drops the GIL while it waits."""
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    trainer.end()


# transformers' `get_length_grouped_indices`: at most 50 batches per mega-batch, fewer to make at least 4 of them.
MEGA_BATCH_BATCHES = 50
# Without length grouping the train loss is only noisy: a mean over the same 50 steps reads it alike.
DEFAULT_SMOOTHING_STEPS = 50
OTHER_COLOURS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:cyan")


@dataclass(frozen=True)
class LossCurve:
    """One line of `loss_curve.png`: its legend label, points and matplotlib style."""

    label: str
    steps: np.ndarray
    values: np.ndarray
    style: dict = field(default_factory=dict)


def mega_batch_steps(trainer: Trainer) -> int | None:
    """Optimizer steps per mega-batch of the Trainer's `group_by_length` sampler, the period of the zig-zag it puts in
    the train loss (None when the trainer does not group by length). `LengthGroupedSampler` cuts the shuffled rows into
    mega-batches of `MEGA_BATCH_BATCHES` batches (fewer on small datasets) and runs each longest first; a batch holds
    one optimizer step of one process, so W processes go through a mega-batch in batches / W steps."""
    args = trainer.args
    if args.train_sampling_strategy != "group_by_length" or trainer.train_dataset is None:
        return None
    rows_per_batch = args.train_batch_size * args.gradient_accumulation_steps
    batches = max(1, min(len(trainer.train_dataset) // (rows_per_batch * 4), MEGA_BATCH_BATCHES))
    return max(1, round(batches / args.world_size))


def _centred_mean(steps: np.ndarray, values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each run of `window` consecutive points, at its centre step. Only whole windows: a cut one at either
    end would average part of a cycle and bend the line where the loss did not."""
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    means = (sums[window:] - sums[:-window]) / window
    centres = (
        steps[(window - 1) // 2 : len(steps) - window // 2] + steps[window // 2 : len(steps) - (window - 1) // 2]
    ) / 2
    return centres, means


def loss_curves(log_history: list[dict], zigzag_period: int | None = None) -> list[LossCurve]:
    """The lines of a loss plot from a Trainer's `log_history`: the train loss raw (faint) and smoothed (bold), other
    logged train losses (stage 0's components, stage 2's `aux_loss`) smoothed, and every validation loss (`eval_*`).

    Smoothing is a centred mean over `zigzag_period` steps (default `DEFAULT_SMOOTHING_STEPS`), at most a quarter of
    the run, drawn where a whole window fits. With length grouping the raw loss is periodic on top of its trend, high
    on each mega-batch's long rows and low on its short ones; a window of exactly one period holds one whole cycle
    wherever it sits, so the mean removes the zig-zag (exactly, when the period is a whole number of logging intervals)
    and keeps the trend, at the right step. An exponential moving average only damps a periodic signal (by its time
    constant) and lags the trend by as much; a longer window would blur the trend for nothing."""
    train: dict[str, list[tuple[int, float]]] = {}
    validation: dict[str, list[tuple[int, float]]] = {}
    run_means: list[tuple[int, float]] = []  # `train_loss`: the run's summary, one mean over all its steps
    for record in log_history:
        if "step" not in record:
            continue
        for key, value in record.items():
            if not key.endswith("loss") or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            point = (record["step"], float(value))
            if key == "train_loss":
                run_means.append(point)
            else:
                (validation if key.startswith("eval_") else train).setdefault(key, []).append(point)
    # The loss in blue (train) and red (validation); each other loss in a colour of its own, train and validation alike.
    others = sorted({key.removeprefix("eval_") for key in [*train, *validation]} - {"loss"})
    colours = {"loss": "tab:blue", **dict(zip(others, itertools.cycle(OTHER_COLOURS)))}
    curves = []
    for key in sorted(train, key=lambda name: (name != "loss", name)):
        steps, values = (np.array(column) for column in zip(*train[key], strict=True))
        spacing = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
        points = max(1, min(round((zigzag_period or DEFAULT_SMOOTHING_STEPS) / spacing), len(steps) // 4))
        name = "train loss" if key == "loss" else f"train {key}"
        smoothed = f"{name} (smoothed: centred mean over {points * spacing:g} steps)"
        if key == "loss":
            raw = {"color": colours[key], "alpha": 0.35, "linewidth": 0.8, "marker": "." if len(steps) < 30 else None}
            curves.append(LossCurve(f"{name} (raw, every {spacing:g} steps)", steps, values, raw))
        width = 2.2 if key == "loss" else 1.2
        curves.append(
            LossCurve(smoothed, *_centred_mean(steps, values, points), {"color": colours[key], "linewidth": width})
        )
    if "loss" not in train and run_means:  # a run shorter than `logging_steps` logs only its mean
        step, mean = run_means[-1]
        style = {"color": colours["loss"], "marker": "o", "linestyle": "none"}
        curves.append(LossCurve("train loss (mean of the run)", np.array([step]), np.array([mean]), style))
    for key in sorted(validation, key=lambda name: (name != "eval_loss", name)):
        steps, values = (np.array(column) for column in zip(*validation[key], strict=True))
        if key == "eval_loss":
            style = {"color": "tab:red", "marker": "o", "linewidth": 2}
        else:
            style = {"color": colours[key.removeprefix("eval_")], "marker": ".", "linestyle": "--", "linewidth": 1}
        curves.append(LossCurve(f"validation {key.removeprefix('eval_')}", steps, values, style))
    return curves


def save_loss_plot(
    log_history: list[dict], path: str | os.PathLike, title: str, zigzag_period: int | None = None
) -> Path | None:
    """A PNG of the run's losses (`loss_curves`) against the step, written atomically (None when nothing was logged).
    `zigzag_period`: steps per length-grouped mega-batch (`mega_batch_steps(trainer)`), which sets the
    smoothing window and adds a note that the raw train loss zig-zags with that period."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(log_history, zigzag_period)
    if not curves:
        return None
    path = Path(path)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for curve in curves:
        axis.plot(curve.steps, curve.values, label=curve.label, **curve.style)
    if zigzag_period and zigzag_period > 1:
        title += (
            f"\nraw train loss zig-zags every {zigzag_period} steps: length-grouped batches, "
            "longest first in each mega-batch"
        )
    axis.set(xlabel="optimizer step", ylabel="loss", title=title)
    axis.title.set_fontsize(9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


__all__ = [
    "AtomicCheckpointMixin",
    "ShardedTrainingMixin",
    "DEFAULT_SHUFFLE_BUFFER_SIZE",
    "ENCODER_MODULES",
    "LOSS_REDUCTIONS",
    "MODULES",
    "SepitSFTTrainer",
    "SequenceAsTextCollator",
    "SHUFFLE_BUFFER_HELP",
    "STREAMING_HELP",
    "SizedIterableDataset",
    "StructureDropoutEpochs",
    "LossCurve",
    "expert_load",
    "freeze_modules",
    "mega_batch_steps",
    "loss_curves",
    "parameter_counts",
    "check_launch",
    "check_lr_scale",
    "give_every_parameter_a_gradient",
    "launcher_engine",
    "use_fsdp_on_cpu",
    "whole_model_loading",
    "load_training_splits",
    "parameter_groups",
    "parquet_row_groups",
    "read_row_groups",
    "save_loss_plot",
    "streaming_options",
    "take_chat_template_path",
]
