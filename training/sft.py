"""SEPIT stages 1 and 2 with TRL's `SFTTrainer`: caption instructions on a dense model (stage 1), then every LLM FFN
upcycled into a mixture of experts, encoder frozen, on all instruction types (stage 2). Only configuration lives
here; the recipes in `recipes/` set everything:

    python training/sft.py --config training/recipes/tiny/stage1.yaml
    python training/sft.py --config training/recipes/tiny/stage2.yaml
    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/sft.py --config ...paper.../stage1.yaml
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from datasets import IterableDataset
from transformers import set_seed
from trl import SFTConfig

from modeling_sepit import SepitConfig, SepitDataCollator, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.cli_sepit import (
    SFT_CONFIG_DOCS,
    check_dataset,
    check_training_run,
    claim_training_output,
    script_parser,
)
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.modeling_sepit_pretraining import load_pretrained_encoder
from modeling_sepit.training_sepit import (
    DEFAULT_SHUFFLE_BUFFER_SIZE,
    LOSS_REDUCTIONS,
    MODULES,
    SHUFFLE_BUFFER_HELP,
    STREAMING_HELP,
    SepitSFTTrainer,
    StructureDropoutEpochs,
    check_launch,
    check_lr_scale,
    configure_sft,
    end_training,
    expert_load,
    freeze_modules,
    llm_lengths,
    load_training_splits,
    mega_batch_steps,
    parameter_counts,
    save_loss_plot,
    streaming_options,
    take_chat_template_path,
    whole_model_loading,
)

# Rows of the evaluation split (else the training split) on which the end of stage 2 reports each expert's load.
EXPERT_LOAD_ROWS = 256


@dataclass
class SepitSFTArguments:
    """What to train on and from: the dataset, the previous stage's folder (or the parts), and the stage's choices."""

    dataset_name: str = field(metadata={"help": "Dataset folder or Hub id built by dataset_card.build_dataset."})
    dataset_config: str = field(default="instructions", metadata={"help": "'captions' (stage 1) or 'instructions'."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="validation")
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A SEPIT folder (the previous stage's output) to continue from."}
    )
    protein_model_name_or_path: str | None = field(default=None, metadata={"help": "ESM-2 checkpoint (new model)."})
    language_model_name_or_path: str | None = field(default=None, metadata={"help": "Chat LLM checkpoint (new)."})
    encoder_warmup_dir: str | None = field(default=None, metadata={"help": "Stage-0 output whose encoder to load."})
    freeze: list[str] = field(
        default_factory=list, metadata={"help": "Parts to freeze: protein_model structure_module language_model ..."}
    )
    encoder_lr_scale: float = field(default=0.1, metadata={"help": "Encoder learning rate / base learning rate."})
    language_model_lr_scale: float = field(default=0.1, metadata={"help": "LLM learning rate / base learning rate."})
    structure_dropout: float = field(default=0.15, metadata={"help": "Probability of dropping a protein's structure."})
    num_experts: int | None = field(default=None, metadata={"help": "Upcycle each LLM FFN into this many experts."})
    num_experts_per_tok: int = field(default=1, metadata={"help": "Experts per token (top-k)."})
    expert_capacity_factor: float | None = field(
        default=None, metadata={"help": "Upcycling: DeepSpeed's capacity factor in training (original: 1.25)."}
    )
    expert_eval_capacity_factor: float | None = field(
        default=None, metadata={"help": "Upcycling: capacity factor in evaluation (original: 2.0)."}
    )
    loss_reduction: str = field(
        default="token",
        metadata={
            "help": "'token': TRL's mean over every answer token of the batch; 'sequence': the original's mean over "
            "each sequence's answer tokens, then over sequences (a yes/no answer weighs as much as a long one)."
        },
    )
    max_protein_length: int = field(default=1022, metadata={"help": "Residues kept per protein (ESM-2: 1022)."})
    protein_pooling: int | None = field(
        default=None,
        metadata={
            "help": "Protein feature positions averaged into one LLM token (beyond the paper; 1: none). Default: the "
            "continued model's value, 1 for a new model. A continued model must keep its saved value: its LLM was "
            "trained on that granularity, so any other value is an error."
        },
    )
    sequence_only: bool | None = field(
        default=None,
        metadata={
            "help": "The paper's sequence-only ablation (plain ESM-2, no structure module) for a new model; a "
            "continued model keeps its own (any other value is an error)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    streaming: bool = field(default=False, metadata={"help": STREAMING_HELP})
    shuffle_buffer_size: int = field(default=DEFAULT_SHUFFLE_BUFFER_SIZE, metadata={"help": SHUFFLE_BUFFER_HELP})
    overwrite: bool = field(
        default=False, metadata={"help": "Write into output_dir even if it holds files this script did not write."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights' dtype when loading: float32 keeps fp32 master weights under bf16 autocast."},
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is None and not (
            self.protein_model_name_or_path and self.language_model_name_or_path
        ):
            raise ValueError(
                "model_name_or_path: give the previous stage's folder, or both protein_model_name_or_path and "
                "language_model_name_or_path to start a new model"
            )
        if self.protein_pooling is not None and self.protein_pooling < 1:
            raise ValueError(f"protein_pooling must be >= 1, got {self.protein_pooling}")
        if self.max_protein_length < 1:
            raise ValueError(
                f"max_protein_length must be >= 1 (residues kept per protein), got {self.max_protein_length}"
            )
        if not 0.0 <= self.structure_dropout <= 1.0:
            raise ValueError(f"structure_dropout must be in [0, 1], got {self.structure_dropout}")
        if self.num_experts is not None and self.num_experts < 1:
            raise ValueError(
                f"num_experts must be >= 1 (experts per LLM feed-forward), or left out for a dense model; got "
                f"{self.num_experts}"
            )
        if self.num_experts is None and self.num_experts_per_tok != 1:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} needs num_experts (upcycling)")
        if self.num_experts is not None and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        for name in ("encoder_lr_scale", "language_model_lr_scale"):
            check_lr_scale(name, getattr(self, name))
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        unknown = set(self.freeze) - set(MODULES)
        if unknown:
            raise ValueError(f"freeze: unknown modules {sorted(unknown)}; choose from {list(MODULES)}")


def load_model_and_processor(
    args: SepitSFTArguments, router_aux_loss_coef: float | None = None
) -> tuple[SepitForConditionalGeneration, SepitProcessor]:
    """The previous stage's folder, or a new model from its parts (+ a stage-0 encoder), upcycled when asked."""
    if args.model_name_or_path:
        saved_config = SepitConfig.from_pretrained(args.model_name_or_path)
        if args.sequence_only not in (None, saved_config.sequence_only):
            raise ValueError(
                f"sequence_only={args.sequence_only} but {args.model_name_or_path} has sequence_only="
                f"{saved_config.sequence_only}: a continued model keeps its encoder; leave sequence_only unset"
            )
        saved = saved_config.protein_pooling
        if args.protein_pooling not in (None, saved):
            raise ValueError(
                f"protein_pooling={args.protein_pooling} but {args.model_name_or_path} was trained with "
                f"protein_pooling={saved}: its LLM learned that granularity; leave protein_pooling unset (or {saved})"
            )
        processor = SepitProcessor.from_pretrained(args.model_name_or_path)
        model = SepitForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=args.dtype)
    else:
        processor = SepitProcessor.from_pretrained_parts(
            args.protein_model_name_or_path, args.language_model_name_or_path
        )
        model = SepitForConditionalGeneration.from_pretrained_parts(
            args.protein_model_name_or_path,
            args.language_model_name_or_path,
            protein_token_id=processor.protein_token_id,
            protein_pooling=1 if args.protein_pooling is None else args.protein_pooling,
            sequence_only=bool(args.sequence_only),
            dtype=args.dtype,
        )
    processor.max_protein_length = args.max_protein_length
    # The model's config is the reference: a processor folder that disagreed would fail at the first batch.
    processor.protein_pooling = model.config.protein_pooling
    if args.encoder_warmup_dir:
        load_pretrained_encoder(model, args.encoder_warmup_dir)
    if args.num_experts:
        # SFTTrainer adds the load-balancing loss, weighted by SFTConfig.router_aux_loss_coef, 0.01 when unset (an
        # explicit 0 turns it off: not a value to replace).
        model.upcycle_to_moe(
            args.num_experts,
            args.num_experts_per_tok,
            router_aux_loss_coef=0.01 if router_aux_loss_coef is None else router_aux_loss_coef,
            expert_capacity_factor=args.expert_capacity_factor,
            expert_eval_capacity_factor=args.expert_eval_capacity_factor,
        )
    freeze_modules(model, args.freeze)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    parser = script_parser((SepitSFTArguments, SFTConfig), __doc__, SFT_CONFIG_DOCS)
    try:
        script_args, training_args = parser.parse_args_and_config(args=argv)
        coefficient = training_args.router_aux_loss_coef
        if coefficient is not None and not (math.isfinite(coefficient) and coefficient >= 0):
            raise ValueError(
                f"router_aux_loss_coef must be a finite number >= 0 (0: no load balancing), got {coefficient}"
            )
        models = ("model_name_or_path", "protein_model_name_or_path", "language_model_name_or_path")
        for name in (*models, "encoder_warmup_dir"):
            require_local_or_cached(getattr(script_args, name), name)  # offline: a missing Hub model stops here
        inputs = [script_args.dataset_name, *(getattr(script_args, name) for name in (*models, "encoder_warmup_dir"))]
        check_training_run(training_args, "sft", inputs, script_args.overwrite, script_args.max_train_samples)
        check_launch(training_args)
        check_dataset(script_args.dataset_name, script_args.dataset_config)
        streaming = streaming_options(training_args, script_args.streaming, script_args.shuffle_buffer_size)
        set_seed(training_args.seed)
        with whole_model_loading(training_args):
            model, processor = load_model_and_processor(script_args, training_args.router_aux_loss_coef)
        template = take_chat_template_path(training_args, processor.tokenizer)
        if template is not None:
            processor.chat_template = template
        configure_sft(training_args, model)
        train_dataset, eval_dataset = load_training_splits(
            script_args.dataset_name,
            script_args.dataset_config,
            script_args.dataset_train_split,
            script_args.dataset_test_split,
            script_args.max_train_samples,
            with_eval=training_args.eval_strategy != "no",
            **streaming,
        )
        length_column = training_args.length_column_name
        if (
            training_args.train_sampling_strategy == "group_by_length"
            and length_column not in train_dataset.column_names
        ):
            train_dataset = train_dataset.map(
                lambda rows: {length_column: llm_lengths(rows, processor)}, batched=True, desc="LLM lengths"
            )
        claim_training_output(training_args, "sft", inputs, script_args.overwrite)
    except (ValueError, OSError, yaml.YAMLError) as error:  # arguments, --config file, model or dataset
        print(f"sft: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    collator = SepitDataCollator(processor, script_args.structure_dropout, seed=training_args.seed)
    trainer = SepitSFTTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=[StructureDropoutEpochs(collator)],
        encoder_lr_scale=script_args.encoder_lr_scale,
        language_model_lr_scale=script_args.language_model_lr_scale,
        loss_reduction=script_args.loss_reduction,
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint={"true": True, "false": None}.get(str(resume).lower(), resume))
    trainer.save_model(training_args.output_dir)

    output_dir = Path(training_args.output_dir)
    load = rows = None
    if model.config.text_config.num_experts is not None:
        # On every process: under FSDP or ZeRO-3 each holds part of the weights, and every forward is collective.
        rows = eval_dataset if eval_dataset is not None else train_dataset
        if isinstance(rows, IterableDataset):
            rows = list(rows.take(EXPERT_LOAD_ROWS))
        else:
            rows = rows.select(range(min(EXPERT_LOAD_ROWS, len(rows))))
        load = expert_load(model, collator, rows, training_args.per_device_eval_batch_size)
    if trainer.is_world_process_zero():
        counts = parameter_counts(model)
        (output_dir / "parameter_counts.json").write_text(json.dumps(counts, indent=2))
        title = f"{'stage 2 (MoE)' if script_args.num_experts else 'stage 1'}: {output_dir.name}"
        save_loss_plot(trainer.state.log_history, output_dir / "loss_curve.png", title, mega_batch_steps(trainer))
        trainer.accelerator.print(f"parameters: {counts}; model saved to {output_dir}")
        if load is not None:
            (output_dir / "expert_load.json").write_text(json.dumps(load, indent=2))
            split = script_args.dataset_test_split if eval_dataset is not None else script_args.dataset_train_split
            trainer.accelerator.print(f"expert load on {len(rows)} {split} rows (fraction of tokens per expert):")
            for layer, fractions in enumerate(load):
                trainer.accelerator.print(f"  layer {layer}: " + " ".join(f"{f:.3f}" for f in fractions))
    end_training(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
