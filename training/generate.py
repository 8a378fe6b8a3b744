"""Answer every question of a dataset split with one system, at scale: greedy answers in batches sorted by length,
one encoder pass per protein per batch, data-parallel across the processes of `accelerate launch` or `torchrun`, and
resumable: rerun the same command after a kill and it skips the questions already answered.

    python training/generate.py --model_name_or_path outputs/stage2 --dataset_name outputs/dataset --split test \\
        --output_dir outputs/generation/test [--system "sepit, structure withheld"] [--batch_size 16]
    accelerate launch --num_processes 8 training/generate.py --device cuda --dtype bfloat16 ... (one GPU per process)

`--system` is one of the evaluation's systems (`sepit`, `sepit, structure withheld`, `llm only, no protein` from a
SEPIT model; `purellm, sequence as text` from a PureLLM folder of `training/pure_llm.py`). Writes, in input order,
`<output_dir>/predictions.jsonl` (the project's format, as `training/evaluate.py` writes it) and
`<output_dir>/<split>_output.jsonl` (the original SEPIT release's inference format, `{"id", "conversation",
"response"}`); both score with `training/score.py`. Each is replaced whole at the end; `<output_dir>/shards/` keeps the
answers as they come (one file per process) and the settings, which a rerun must repeat. `output_dir` is written only
when it is new, empty or an earlier generation (else `--overwrite`, which also starts over).

`--streaming`: for a split larger than memory, the Parquet files are read as a `datasets` `IterableDataset`,
`--stream_window` rows at a time, the windows shared among the processes (`split_dataset_by_node`); each window is
sorted by length and batched as the whole split is without it, and the outputs are written by reading the stream
again. Resuming after a kill works the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.atomic_folder import check_output_path
from modeling_sepit.batch_generation import (
    SHARDS,
    check_generation_settings,
    generate_streamed,
    original_records,
    prediction_records,
    question_rows,
    start_sharded_run,
    write_jsonl,
)
from modeling_sepit.cli_sepit import check_device, script_parser
from modeling_sepit.evaluation_sepit import PURE_LLM, SEPIT, SYSTEMS, generate_answers, system_requests
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.pure_llm import load_pure_llm

WRITER = "generate"


@dataclass
class GenerationArguments:
    """Which model answers which split, and how."""

    model_name_or_path: str = field(metadata={"help": f"SEPIT folder or Hub id; a PureLLM folder for {PURE_LLM!r}."})
    output_dir: str = field(metadata={"help": "Folder for the answers (and the shards a rerun resumes from)."})
    dataset_name: str = field(default="outputs/dataset", metadata={"help": "Dataset built by dataset_card."})
    dataset_config: str = field(
        default="instructions", metadata={"help": "Config holding the questions ('' for a folder without configs)."}
    )
    split: str = field(default="test", metadata={"help": "Split to answer."})
    system: str = field(default=SEPIT, metadata={"help": f"What the model is given: one of {list(SYSTEMS)}."})
    max_samples: int | None = field(default=None, metadata={"help": "Answer only the first N questions."})
    batch_size: int = field(default=8, metadata={"help": "Questions generated together (per process)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length limit of each answer."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights' dtype: auto (the checkpoint's own, transformers' default), float32, bfloat16."},
    )
    device: str = field(
        default="cpu", metadata={"help": "Device to generate on; cuda under several processes: one GPU each."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write output_dir even if something else wrote it, and start over."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Read the split as a stream (datasets' IterableDataset), not whole."}
    )
    stream_window: int = field(
        default=1024, metadata={"help": "With --streaming: rows read, sorted by length and batched together."}
    )

    def __post_init__(self) -> None:
        given = self.model_name_or_path
        if (Path(given).is_absolute() or given.startswith(".")) and not Path(given).is_dir():
            raise ValueError(f"model_name_or_path: {given} is not a folder; give a model folder or a Hub id")
        if self.system not in SYSTEMS:
            raise ValueError(f"system: {self.system!r}; choose from {list(SYSTEMS)}")
        check_generation_settings(self.max_samples, self.batch_size, self.max_new_tokens)
        if self.stream_window < 1:
            raise ValueError(f"stream_window must be at least 1, got {self.stream_window}")
        if not self.split or "/" in self.split:
            raise ValueError(f"split: {self.split!r} is not a split name")
        check_device(self.device)
        check_output_path(self.output_dir, WRITER, self.inputs, self.overwrite)

    @property
    def inputs(self) -> list[str]:
        """What the generation reads: the output may not replace or lie inside any of them."""
        return [self.model_name_or_path, self.dataset_name]

    @property
    def settings(self) -> dict[str, str | int | bool | None]:
        """What the answers depend on besides the questions, batch size and token limit: a rerun must repeat it (a
        streamed run also names its rows, whose fingerprint it cannot take without reading them all first)."""
        settings = {"model": self.model_name_or_path, "dtype": self.dtype}
        if self.streaming:
            rows = {"dataset": self.dataset_name, "config": self.dataset_config, "split": self.split}
            settings |= {"streaming": True, **rows, "max_samples": self.max_samples}
        return settings


def _generate_streamed(
    args: GenerationArguments,
    model: PreTrainedModel,
    processor: SepitProcessor | PreTrainedTokenizerBase,
    rows: IterableDataset,
    shard_dir: Path,
) -> list[str]:
    """The answers to a streamed split, in row order (`batch_generation.generate_streamed`)."""
    known = rows.info.splits[args.split].num_examples if rows.info.splits and args.split in rows.info.splits else None
    total = min(known, args.max_samples or known) if known is not None else None
    answers = generate_streamed(
        model,
        processor,
        rows,
        lambda window: system_requests(model, processor, window, args.system),
        args.batch_size,
        args.max_new_tokens,
        window=args.stream_window,
        shard_dir=shard_dir,
        settings={"system": args.system, **args.settings},
        description=f"generating ({args.system})",
        total=total,
    )
    return [answers[i] for i in range(len(answers))]


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([GenerationArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        require_local_or_cached(args.model_name_or_path, "model_name_or_path")
        rows = question_rows(
            args.dataset_name, args.dataset_config or None, args.split, field="dataset_name", streaming=args.streaming
        )
        if args.max_samples is not None:
            rows = (
                rows.take(args.max_samples) if args.streaming else rows.select(range(min(args.max_samples, len(rows))))
            )
        if args.system == PURE_LLM:
            model, processor = load_pure_llm(args.model_name_or_path, args.dtype)
        else:
            processor = SepitProcessor.from_pretrained(args.model_name_or_path)
            model = SepitForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=args.dtype)
    except (ValueError, OSError) as error:  # arguments, model or dataset
        print(f"generate: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    state, device = start_sharded_run(args.device, output_dir, WRITER, args.inputs, args.overwrite)
    try:
        if args.streaming:
            answers = _generate_streamed(args, model.to(device), processor, rows, output_dir / SHARDS)
        else:
            answers = generate_answers(
                model.to(device),
                processor,
                rows,
                args.system,
                args.batch_size,
                args.max_new_tokens,
                shard_dir=output_dir / SHARDS,
                settings=args.settings,
            )
    except ValueError as error:  # the shards of an earlier run with other settings
        print(f"generate: error: {' '.join(str(error).split())} (--overwrite starts over here)", file=sys.stderr)
        return 2
    if state.is_main_process:
        write_jsonl(output_dir / "predictions.jsonl", prediction_records(rows, {args.system: answers}))
        write_jsonl(output_dir / f"{args.split}_output.jsonl", original_records(rows, answers))
        print(f"generate: {len(answers)} answers ({args.system}) in {output_dir}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
