"""The paper's PureLLM baseline: the same LLM SEPIT starts from, fine-tuned with TRL's `SFTTrainer` on the same
instructions and steps as stage 2, each protein written into the prompt as its amino-acid sequence
(`<bop>SEQUENCE<eop>` where SEPIT has `<protein>`; SEPIT's chat template; labels on the answers). It is what a user
without SEPIT would do; `training/evaluate.py --pure_llm_model_name_or_path` sets it beside SEPIT. Only
configuration lives here:

    python training/pure_llm.py --config training/recipes/tiny/pure_llm.yaml
    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/pure_llm.py \\
        --config training/recipes/paper-tinyllama/pure_llm.yaml

The output folder is a plain causal LM and its tokenizer (`AutoModelForCausalLM` / `AutoTokenizer`), with
`loss_curve.png`; `max_length` is the text length in tokens (the original's 2048).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig

from modeling_sepit.cli_sepit import (
    SFT_CONFIG_DOCS,
    check_dataset,
    check_training_run,
    claim_training_output,
    script_parser,
)
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.pure_llm import prepare_pure_llm
from modeling_sepit.training_sepit import (
    DEFAULT_SHUFFLE_BUFFER_SIZE,
    LOSS_REDUCTIONS,
    SHUFFLE_BUFFER_HELP,
    STREAMING_HELP,
    SepitSFTTrainer,
    SequenceAsTextCollator,
    end_training,
    load_training_splits,
    mega_batch_steps,
    save_loss_plot,
    streaming_options,
    take_chat_template_path,
)

WRITER = "pure_llm"


@dataclass
class PureLLMArguments:
    """What to train: the plain LLM, the dataset, and how much of each protein the prompt holds."""

    language_model_name_or_path: str = field(metadata={"help": "Chat LLM checkpoint (the one SEPIT starts from)."})
    dataset_name: str = field(metadata={"help": "Dataset folder or Hub id built by dataset_card.build_dataset."})
    dataset_config: str = field(default="instructions", metadata={"help": "Config of the questions (stage 2's)."})
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="validation")
    max_protein_length: int = field(
        default=1022, metadata={"help": "Residues written per protein (as SEPIT's processor keeps)."}
    )
    loss_reduction: str = field(
        default="token",
        metadata={"help": "'token': TRL's mean over every answer token; 'sequence': per answer, then over answers."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    streaming: bool = field(default=False, metadata={"help": STREAMING_HELP})
    shuffle_buffer_size: int = field(default=DEFAULT_SHUFFLE_BUFFER_SIZE, metadata={"help": SHUFFLE_BUFFER_HELP})
    overwrite: bool = field(
        default=False, metadata={"help": "Write output_dir even if it holds files this script did not write."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights' dtype when loading: float32 keeps fp32 master weights under bf16 autocast."},
    )

    def __post_init__(self) -> None:
        if self.max_protein_length < 1:
            raise ValueError(
                f"max_protein_length must be >= 1 (residues written per protein), got {self.max_protein_length}"
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser((PureLLMArguments, SFTConfig), __doc__, SFT_CONFIG_DOCS)
    try:
        script_args, training_args = parser.parse_args_and_config(args=argv)
        require_local_or_cached(script_args.language_model_name_or_path, "language_model_name_or_path")
        inputs = [script_args.dataset_name, script_args.language_model_name_or_path]
        check_training_run(training_args, WRITER, inputs, script_args.overwrite, script_args.max_train_samples)
        if training_args.max_length is not None and training_args.max_length < 1:
            raise ValueError(f"max_length must be >= 1 (text tokens per conversation), got {training_args.max_length}")
        check_dataset(script_args.dataset_name, script_args.dataset_config)
        streaming = streaming_options(training_args, script_args.streaming, script_args.shuffle_buffer_size)
        set_seed(training_args.seed)
        tokenizer = AutoTokenizer.from_pretrained(script_args.language_model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(script_args.language_model_name_or_path, dtype=script_args.dtype)
        prepare_pure_llm(model, tokenizer, script_args.max_protein_length)
        template = take_chat_template_path(training_args, tokenizer)
        if template is not None:
            tokenizer.chat_template = template
        collator = SequenceAsTextCollator(tokenizer, script_args.max_protein_length, training_args.max_length)
        # The collator reads the dataset's rows itself, as SEPIT's does (sft.py's configure_sft).
        training_args.remove_unused_columns = False
        training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
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
        if training_args.train_sampling_strategy == "group_by_length":
            train_dataset = train_dataset.map(
                lambda rows: {length_column: collator.lengths(rows)}, batched=True, desc="text lengths"
            )
        claim_training_output(training_args, WRITER, inputs, script_args.overwrite)
    except (ValueError, OSError, yaml.YAMLError) as error:  # arguments, --config file, model or dataset
        print(f"pure_llm: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    trainer = SepitSFTTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        loss_reduction=script_args.loss_reduction,
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint={"true": True, "false": None}.get(str(resume).lower(), resume))
    trainer.save_model(training_args.output_dir)

    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        title = f"PureLLM (sequence as text): {output_dir.name}"
        save_loss_plot(trainer.state.log_history, output_dir / "loss_curve.png", title, mega_batch_steps(trainer))
        trainer.accelerator.print(f"parameters: {model.num_parameters():,}; model saved to {output_dir}")
    end_training(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
