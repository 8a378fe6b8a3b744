"""SEPIT stage 0, encoder warm-up: the structure-aware ESM-2 encoder trained alone on caption rows with the contrastive,
coordinate-denoising and masked-residue losses, before any LLM. Only configuration lives here; the recipes in
`recipes/` set everything:

    python training/stage0_encoder_warmup.py --config training/recipes/tiny/stage0.yaml
    torchrun --nproc_per_node 8 training/stage0_encoder_warmup.py --config training/recipes/paper-tinyllama/stage0.yaml

`--resume_from_checkpoint true` continues from the newest checkpoint in `output_dir` (checkpoints appear whole). The
output folder loads with `SepitForProteinPretraining.from_pretrained`; stage 1 takes its encoder with
`encoder_warmup_dir`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed
from transformers.training_args import ParallelMode

from modeling_sepit.cli_sepit import (
    TRAINING_ARGUMENTS_DOCS,
    check_dataset,
    check_training_run,
    claim_training_output,
    script_parser,
)
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.modeling_sepit_pretraining import SepitForProteinPretraining, SepitPretrainingCollator
from modeling_sepit.training_sepit import (
    DEFAULT_SHUFFLE_BUFFER_SIZE,
    SHUFFLE_BUFFER_HELP,
    STREAMING_HELP,
    AtomicCheckpointMixin,
    ShardedTrainingMixin,
    check_launch,
    check_lr_scale,
    end_training,
    load_training_splits,
    mega_batch_steps,
    save_loss_plot,
    streaming_options,
    whole_model_loading,
)

LOSS_COMPONENTS = ("contrastive_loss", "denoising_loss", "masked_residue_loss")
MODEL_OVERRIDES = (
    "projection_dim",
    "mlm_probability",
    "coordinate_noise_scale",
    "num_gaussian_kernels",
    "masked_residue_head_type",
    "position_head_dropout",
)
# Trained at the base learning rate, as in the original: the pretrained ESM-2 and the contrastive temperature (which
# its optimizer left out of the modules it scaled); everything else is new and trains at `new_modules_lr_scale`.
BASE_RATE_PREFIXES = ("model.protein_model.", "logit_scale")
WRITER = "stage0_encoder_warmup"


@dataclass
class Stage0Arguments:
    """What to train on and from: the caption rows, the parts (or a stage-0 folder to continue), and the stage's
    choices."""

    dataset_name: str = field(metadata={"help": "Dataset folder or Hub id built by dataset_card.build_dataset."})
    dataset_config: str = field(default="captions", metadata={"help": "Config with sequence/coords/caption rows."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="validation")
    model_name_or_path: str | None = field(default=None, metadata={"help": "A stage-0 folder to continue from."})
    protein_model_name_or_path: str | None = field(default=None, metadata={"help": "ESM-2 checkpoint (new model)."})
    text_encoder_name_or_path: str | None = field(
        default=None, metadata={"help": "Frozen caption encoder checkpoint (new model), e.g. PubMedBERT."}
    )
    max_protein_length: int = field(default=1022, metadata={"help": "Residues kept per protein (ESM-2: 1022)."})
    max_caption_length: int = field(default=512, metadata={"help": "Caption tokens kept (original: 512)."})
    new_modules_lr_scale: float = field(
        default=10.0,
        metadata={
            "help": "Learning rate of the new modules (structure module, projections, heads) / base rate; ESM-2 and "
            "the temperature train at the base rate (original lr_ratio: 10)."
        },
    )
    projection_dim: int | None = field(default=None, metadata={"help": "Contrastive embedding width (new model)."})
    mlm_probability: float | None = field(default=None, metadata={"help": "Fraction of residues masked (new model)."})
    coordinate_noise_scale: float | None = field(
        default=None, metadata={"help": "Coordinate noise in Angstrom (new model)."}
    )
    num_gaussian_kernels: int | None = field(
        default=None, metadata={"help": "Distance kernels of the structure module (new model; stage 1 must match)."}
    )
    masked_residue_head_type: str | None = field(
        default=None,
        metadata={
            "help": "New model: 'esm' (default), ESM-2's pretrained masked-LM head; 'original', the original's fresh "
            "head with projection_dim logits."
        },
    )
    position_head_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout in the denoising head's attention (new model; default 0.1, the original's)."},
    )
    streaming: bool = field(default=False, metadata={"help": STREAMING_HELP})
    shuffle_buffer_size: int = field(default=DEFAULT_SHUFFLE_BUFFER_SIZE, metadata={"help": SHUFFLE_BUFFER_HELP})
    overwrite: bool = field(
        default=False, metadata={"help": "Write into output_dir even if it holds files this script did not write."}
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is None and not (self.protein_model_name_or_path and self.text_encoder_name_or_path):
            raise ValueError(
                "model_name_or_path: give a stage-0 folder to continue from, or both protein_model_name_or_path and "
                "text_encoder_name_or_path to start a new model"
            )
        given = [name for name in MODEL_OVERRIDES if getattr(self, name) is not None]
        if self.model_name_or_path and given:
            raise ValueError(f"{given}: these build a new model; a continued model keeps its saved config")
        check_lr_scale("new_modules_lr_scale", self.new_modules_lr_scale)
        if self.max_protein_length < 1 or self.max_caption_length < 1:
            raise ValueError(
                f"max_protein_length and max_caption_length must be >= 1, got {self.max_protein_length} and "
                f"{self.max_caption_length}"
            )


class SepitPretrainingTrainer(ShardedTrainingMixin, AtomicCheckpointMixin, Trainer):
    """`Trainer` that logs each stage-0 loss next to `loss` (averaged, like it, over the logging interval and the
    processes), gives the modules trained from scratch their own learning rate (ESM-2 and the temperature keep the base
    rate), as the original did, and writes each checkpoint whole (`AtomicCheckpointMixin`); FSDP2 runs as
    `ShardedTrainingMixin` describes."""

    def __init__(self, *args, new_modules_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.new_modules_lr_scale = new_modules_lr_scale
        # Per mode ("train", "eval"): the summed component losses and, last, the number of batches.
        self._loss_sums: dict[str, torch.Tensor] = {}
        # The model returns its loss without `labels`: let evaluation report it.
        self.can_return_loss = True

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    scale = 1.0 if name.startswith(BASE_RATE_PREFIXES) else self.new_modules_lr_scale
                    groups.setdefault((scale, name in decay), []).append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            learning_rate = optimizer_kwargs.pop("lr", self.args.learning_rate)
            self.optimizer = optimizer_cls(
                [
                    {
                        "params": params,
                        "lr": learning_rate * scale,
                        "weight_decay": self.args.weight_decay if decays else 0.0,
                    }
                    for (scale, decays), params in sorted(groups.items())
                ],
                **optimizer_kwargs,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        components = [outputs[name].detach().float() for name in LOSS_COMPONENTS]
        step = torch.stack([*components, torch.ones_like(components[0])])
        self._loss_sums[mode] = self._loss_sums[mode] + step if mode in self._loss_sums else step
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Only the `loss` / `eval_loss` records, which every process logs together, so the reduction cannot hang.
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode in self._loss_sums:
            sums = self.accelerator.reduce(self._loss_sums.pop(mode), reduction="sum")
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + name: (sums[i] / sums[-1]).item() for i, name in enumerate(LOSS_COMPONENTS)})
        super().log(logs, start_time)


def load_model_and_collator(args: Stage0Arguments) -> tuple[SepitForProteinPretraining, SepitPretrainingCollator]:
    """A stage-0 folder and its tokenizers, or a new model from ESM-2 and the caption encoder."""
    lengths = {"max_protein_length": args.max_protein_length, "max_caption_length": args.max_caption_length}
    if args.model_name_or_path:
        model = SepitForProteinPretraining.from_pretrained(args.model_name_or_path)
        return model, SepitPretrainingCollator.from_pretrained(args.model_name_or_path, **lengths)
    overrides = {name: getattr(args, name) for name in MODEL_OVERRIDES if getattr(args, name) is not None}
    model = SepitForProteinPretraining.from_pretrained_parts(
        args.protein_model_name_or_path, args.text_encoder_name_or_path, **overrides
    )
    protein_tokenizer = AutoTokenizer.from_pretrained(args.protein_model_name_or_path)
    text_tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_name_or_path)
    return model, SepitPretrainingCollator(protein_tokenizer, text_tokenizer, **lengths)


def build_trainer(args: Stage0Arguments, training_args: TrainingArguments) -> SepitPretrainingTrainer:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        # Accelerate sets up CPU processes for DDP only with `cpu=True`; otherwise each process trains its own copy.
        raise ValueError(
            "several processes were launched but Accelerate found no GPU: set use_cpu: true to train on CPU"
        )
    training_args.remove_unused_columns = False  # the collator needs sequence, coords and caption
    # Evaluation reports the losses; keeping every batch's embeddings and logits would only fill memory.
    training_args.prediction_loss_only = True
    if training_args.ddp_find_unused_parameters is None:
        # A batch without any structure leaves the structure module out of the graph.
        training_args.ddp_find_unused_parameters = True
    streaming = streaming_options(training_args, args.streaming, args.shuffle_buffer_size)  # before the model
    set_seed(training_args.seed)  # the fresh modules' initialisation
    with whole_model_loading(training_args):
        model, collator = load_model_and_collator(args)
    train_dataset, eval_dataset = load_training_splits(
        args.dataset_name,
        args.dataset_config,
        args.dataset_train_split,
        args.dataset_test_split,
        max_train_samples=None,
        with_eval=training_args.eval_strategy != "no",
        **streaming,
    )
    return SepitPretrainingTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=collator,
        new_modules_lr_scale=args.new_modules_lr_scale,
    )


def main(argv: list[str] | None = None) -> int:
    parser = script_parser((Stage0Arguments, TrainingArguments), __doc__, TRAINING_ARGUMENTS_DOCS)
    try:
        script_args, training_args = parser.parse_args_and_config(args=argv)
        models = ("model_name_or_path", "protein_model_name_or_path", "text_encoder_name_or_path")
        for name in models:
            require_local_or_cached(getattr(script_args, name), name)  # offline: a missing Hub model stops here
        inputs = [script_args.dataset_name, *(getattr(script_args, name) for name in models)]
        check_training_run(training_args, WRITER, inputs, script_args.overwrite)
        check_launch(training_args)
        check_dataset(script_args.dataset_name, script_args.dataset_config)
        trainer = build_trainer(script_args, training_args)
        claim_training_output(training_args, WRITER, inputs, script_args.overwrite)
    except (ValueError, OSError, yaml.YAMLError) as error:  # arguments, --config file, model or dataset
        print(f"stage0_encoder_warmup: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint={"true": True, "false": None}.get(str(resume).lower(), resume))
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        title = f"stage 0: {output_dir.name}"
        save_loss_plot(trainer.state.log_history, output_dir / "loss_curve.png", title, mega_batch_steps(trainer))
        trainer.accelerator.print(f"stage-0 model saved to {output_dir}")
    end_training(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
