"""Fine-tune a published SEPIT model (a Hub id or any `from_pretrained` folder) with LoRA: low-rank adapters on the
LLM's attention and MLP projections (and, with `--lora_encoder true`, on the ESM-2 attention), the projector trained
in full, everything else frozen. Trained with TRL's `SFTTrainer`; at the end the adapter is kept in `output_dir` and
merged into a standalone, Hub-ready folder (`merged_dir`) that loads without PEFT. Only configuration lives here:

    python training/finetune_lora.py --config training/recipes/tiny/lora.yaml
    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/finetune_lora.py \
        --config training/recipes/paper-tinyllama/lora.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from peft import LoraConfig, PeftModel
from transformers import set_seed
from trl import SFTConfig

from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.atomic_folder import check_output_path
from modeling_sepit.cli_sepit import (
    SFT_CONFIG_DOCS,
    check_dataset,
    check_training_run,
    claim_training_output,
    script_parser,
)
from modeling_sepit.hub_sepit import require_local_or_cached, save_hub_folder
from modeling_sepit.training_sepit import (
    DEFAULT_SHUFFLE_BUFFER_SIZE,
    SHUFFLE_BUFFER_HELP,
    STREAMING_HELP,
    SepitSFTTrainer,
    StructureDropoutEpochs,
    configure_sft,
    end_training,
    load_training_splits,
    mega_batch_steps,
    save_loss_plot,
    streaming_options,
)

WRITER = "finetune_lora"
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER_PROJECTIONS = ("query", "key", "value")


@dataclass
class SepitLoraArguments:
    """What to fine-tune and on what: the SEPIT model, the dataset, and the adapter's shape."""

    model_name_or_path: str = field(metadata={"help": "SEPIT folder or Hub id (e.g. a stage-2 output) to adapt."})
    dataset_name: str = field(metadata={"help": "Dataset folder or Hub id built by dataset_card.build_dataset."})
    dataset_config: str = field(default="instructions", metadata={"help": "'instructions' or 'captions'."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="validation")
    lora_r: int = field(default=16, metadata={"help": "Rank of the adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LLM_PROJECTIONS),
        metadata={"help": "LLM projections that get adapters (every decoder layer; every expert of an MoE FFN)."},
    )
    lora_encoder: bool = field(
        default=False, metadata={"help": "Also put adapters on the ESM-2 self-attention (query, key, value)."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights' dtype on loading: 'auto' keeps the checkpoint's; 'float32' gives the trained projector "
            "full-precision master weights under `bf16` mixed precision (the frozen base could stay 'bfloat16')."
        },
    )
    structure_dropout: float = field(default=0.0, metadata={"help": "Probability of dropping a protein's structure."})
    max_protein_length: int = field(default=1022, metadata={"help": "Residues kept per protein (ESM-2: 1022)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    streaming: bool = field(default=False, metadata={"help": STREAMING_HELP})
    shuffle_buffer_size: int = field(default=DEFAULT_SHUFFLE_BUFFER_SIZE, metadata={"help": SHUFFLE_BUFFER_HELP})
    merged_dir: str | None = field(
        default=None, metadata={"help": "Folder for the merged model (default: <output_dir>/merged); '' skips it."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write output_dir and merged_dir even if they hold other files."}
    )

    def __post_init__(self) -> None:
        local = Path(self.model_name_or_path)
        if (local.is_absolute() or self.model_name_or_path.startswith(".")) and not local.is_dir():
            raise ValueError(f"model_name_or_path: {local} is not a folder; give a SEPIT folder or a Hub id")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1 (the adapters' rank), got {self.lora_r}")
        if self.max_protein_length < 1:
            raise ValueError(
                f"max_protein_length must be >= 1 (residues kept per protein), got {self.max_protein_length}"
            )
        if not 0.0 <= self.structure_dropout <= 1.0:
            raise ValueError(f"structure_dropout must be in [0, 1], got {self.structure_dropout}")


def lora_target_pattern(projections: list[str] | tuple[str, ...], encoder: bool) -> str:
    """A regex PEFT full-matches against module names. Anchored at the LLM decoder layers (and the ESM-2 attention when
    `encoder`), so a name like `value` or `dense` elsewhere in the model never gets an adapter."""
    names = "|".join(projections)
    llm = rf"model\.language_model\.layers\.\d+\.(?:self_attn|mlp|mlp\.experts\.\d+)\.(?:{names})"
    if not encoder:
        return llm
    esm = rf"model\.protein_model\.encoder\.layer\.\d+\.attention\.self\.(?:{'|'.join(ENCODER_PROJECTIONS)})"
    return f"(?:{llm})|(?:{esm})"


def lora_config(args: SepitLoraArguments) -> LoraConfig:
    """Adapters where the pattern says; the projector is trained and saved whole (`modules_to_save`)."""
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_pattern(args.lora_target_modules, args.lora_encoder),
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )


def merge_adapter(
    model_name_or_path: str,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Merge a saved adapter into a fresh copy of its base and write a standalone Hub folder (weights, config with
    `auto_map`, remote code, processor). Done from the saved files, so it works the same after DDP, FSDP or ZeRO-3
    runs, whose in-memory model may be sharded."""
    base = SepitForConditionalGeneration.from_pretrained(model_name_or_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    processor = SepitProcessor.from_pretrained(adapter_dir)
    return save_hub_folder(merged, processor, merged_dir, inputs=[model_name_or_path], overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser((SepitLoraArguments, SFTConfig), __doc__, SFT_CONFIG_DOCS)
    try:
        script_args, training_args = parser.parse_args_and_config(args=argv)
        require_local_or_cached(script_args.model_name_or_path, "model_name_or_path")  # offline: a missing Hub model
        inputs = [script_args.model_name_or_path, script_args.dataset_name]
        check_training_run(training_args, WRITER, inputs, script_args.overwrite, script_args.max_train_samples)
        merged_dir = script_args.merged_dir
        if merged_dir is None:
            merged_dir = Path(training_args.output_dir) / "merged"
        if merged_dir:
            check_output_path(merged_dir, "save_hub_folder", inputs, script_args.overwrite, field="merged_dir")
        check_dataset(script_args.dataset_name, script_args.dataset_config)
        streaming = streaming_options(training_args, script_args.streaming, script_args.shuffle_buffer_size)
        set_seed(training_args.seed)
        processor = SepitProcessor.from_pretrained(script_args.model_name_or_path)
        processor.max_protein_length = script_args.max_protein_length
        model = SepitForConditionalGeneration.from_pretrained(script_args.model_name_or_path, dtype=script_args.dtype)
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
        claim_training_output(training_args, WRITER, inputs, script_args.overwrite)
    except (ValueError, OSError, yaml.YAMLError) as error:  # arguments, --config file, model or dataset
        print(f"finetune_lora: error: {' '.join(str(error).split())}", file=sys.stderr)
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
        peft_config=lora_config(script_args),
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint={"true": True, "false": None}.get(str(resume).lower(), resume))
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))  # the adapter (+ projector) and the processor
    trainer.save_state()

    if trainer.is_world_process_zero():
        title = f"LoRA: {output_dir.name}"
        save_loss_plot(trainer.state.log_history, output_dir / "loss_curve.png", title, mega_batch_steps(trainer))
        if merged_dir:
            merge_adapter(
                script_args.model_name_or_path, output_dir, merged_dir, script_args.dtype, script_args.overwrite
            )
            trainer.accelerator.print(f"adapter in {output_dir}; merged model in {merged_dir}")
    trainer.accelerator.wait_for_everyone()
    end_training(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
