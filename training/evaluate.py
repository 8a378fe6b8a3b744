"""Evaluate a SEPIT model on a test split: batched greedy answers from the model and from its baselines (the same
model with the structure withheld; its LLM with no protein; with `--pure_llm_model_name_or_path`, the paper's PureLLM,
an LLM fine-tuned with the sequence written as text, from `training/pure_llm.py`), scored with BLEU-1..4,
ROUGE-1/2/L, METEOR, BERTScore and yes/no accuracy, overall and per question type. Only configuration lives here:

    python training/evaluate.py --model_name_or_path outputs/stage2 --dataset_name outputs/dataset \\
        --output_dir outputs/evaluation [--external_benchmarks outputs/instructprotein] \\
        [--pure_llm_model_name_or_path outputs/pure-llm] [--protocol sepit]

With the dataset's train split, a fourth baseline needs no model: `retrieval` answers each question as the most
identical training protein did (`dataset_card.retrieval_baseline`; `--retrieval false` leaves it out), and each
benchmark's `metrics.md` and `retrieval.json` say how identical those neighbours were.

`--protocol corpus` (the default) scores as this project does (corpus BLEU, fractions); `--protocol sepit` as the
paper's evaluation script (per answer then averaged, x100, word-piece BLEU/METEOR, BERTScore on every layer), so the
figures compare with the paper's. `training/score.py` rescores the predictions later, under either protocol.

Writes `<output_dir>/<benchmark>/metrics.{json,md,png}` and `predictions.jsonl` (question, reference, every system's
answer), for the held-out split (`heldout`) and, when given, the InstructProtein yes/no sets (`instructprotein`,
built by `python -m dataset_card.external_benchmarks`). The paper's BERTScore model is PubMedBERT; offline, pass a
local folder (the default is all-MiniLM-L6-v2, shipped in the `eval` extra; under `sepit` its tokenizer also cuts
the BLEU and METEOR tokens). `output_dir` is written all at once when
every benchmark is scored (a run killed before leaves the previous reports whole), and only over an earlier
evaluation's folder, an empty one or a new path (else `--overwrite`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import get_dataset_split_names
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dataset_card.retrieval_baseline import RETRIEVAL, RETRIEVAL_THRESHOLD, retrieve_answers, write_neighbours
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.atomic_folder import atomic_folder, check_output_path
from modeling_sepit.batch_generation import check_generation_settings, prediction_records, question_rows, write_jsonl
from modeling_sepit.cli_sepit import check_device, script_parser
from modeling_sepit.evaluation_sepit import PURE_LLM, SEPIT_SYSTEMS, SYSTEMS, generate_answers, is_closed
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.metrics_sepit import PROTOCOLS, resolve_bertscore, score_answers, write_report
from modeling_sepit.pure_llm import load_pure_llm

PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"  # the paper's evaluation config
WRITER = "evaluate"


@dataclass
class EvaluationArguments:
    """What to evaluate, on what, and how answers are generated and scored."""

    model_name_or_path: str = field(metadata={"help": "SEPIT folder or Hub id (model + processor)."})
    output_dir: str = field(metadata={"help": "Folder for the metrics, charts and predictions."})
    dataset_name: str = field(default="outputs/dataset", metadata={"help": "Dataset built by dataset_card."})
    dataset_config: str = field(default="instructions", metadata={"help": "Config holding the questions."})
    split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    external_benchmarks: str | None = field(
        default=None, metadata={"help": "Folder written by dataset_card.external_benchmarks (InstructProtein)."}
    )
    pure_llm_model_name_or_path: str | None = field(
        default=None, metadata={"help": f"PureLLM folder (training/pure_llm.py) answering as {PURE_LLM!r}."}
    )
    systems: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Systems to compare: any of {list(SYSTEMS)}; default: all ({PURE_LLM!r} when its folder is given)."
        },
    )
    retrieval: bool | None = field(
        default=None,
        metadata={
            "help": f"Add {RETRIEVAL!r}: each question answered as the most identical training protein did; default: "
            "when the dataset has a train split (true without one is an error)."
        },
    )
    retrieval_threshold: float = field(
        default=RETRIEVAL_THRESHOLD,
        metadata={"help": "Neighbour identities at or above it are measured exactly (lower: more alignments)."},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N questions."})
    batch_size: int = field(default=8, metadata={"help": "Questions generated together."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length limit of each answer."})
    bertscore_model: str | None = field(
        default=None,
        metadata={
            "help": f"BERTScore model (name or folder; the paper: {PUBMEDBERT}); default: the bundled "
            "all-MiniLM-L6-v2; 'none' skips BERTScore."
        },
    )
    bertscore_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Layer BERTScore reads (corpus protocol: needed for models bert-score has no default for; sepit: "
            "every layer, leave unset)."
        },
    )
    protocol: str = field(
        default="corpus",
        metadata={"help": f"How answers are scored: one of {list(PROTOCOLS)} (sepit: as the paper's script)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights' dtype: auto (the checkpoint's own, transformers' default), float32, bfloat16."},
    )
    device: str = field(default="cpu", metadata={"help": "Device to generate on (cuda on a GPU machine)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir even if it holds something else than an evaluation."}
    )

    def __post_init__(self) -> None:
        for name, what in (
            ("model_name_or_path", "a SEPIT folder"),
            ("pure_llm_model_name_or_path", "a PureLLM folder"),
        ):
            given = getattr(self, name)
            if given and (Path(given).is_absolute() or given.startswith(".")) and not Path(given).is_dir():
                raise ValueError(f"{name}: {given} is not a folder; give {what} or a Hub id")
        if self.systems is None:
            self.systems = list(SEPIT_SYSTEMS) + ([PURE_LLM] if self.pure_llm_model_name_or_path else [])
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown or not self.systems:
            raise ValueError(f"systems: {sorted(unknown) or 'none given'}; choose from {list(SYSTEMS)}")
        if (PURE_LLM in self.systems) != bool(self.pure_llm_model_name_or_path):
            raise ValueError(
                f"pure_llm_model_name_or_path: the {PURE_LLM!r} system and its folder go together; give both (the "
                "folder from training/pure_llm.py) or neither"
            )
        if not 0.0 < self.retrieval_threshold <= 1.0:
            raise ValueError(f"retrieval_threshold must be an identity in (0, 1], got {self.retrieval_threshold}")
        check_generation_settings(self.max_samples, self.batch_size, self.max_new_tokens)
        self.bertscore_model, self.bertscore_num_layers = resolve_bertscore(
            self.bertscore_model, self.bertscore_num_layers, self.protocol
        )
        check_device(self.device)
        check_output_path(self.output_dir, WRITER, self.inputs, self.overwrite)

    @property
    def inputs(self) -> list[str | None]:
        """What the evaluation reads: the output may not replace or lie inside any of them."""
        return [
            self.model_name_or_path,
            self.pure_llm_model_name_or_path,
            self.dataset_name,
            self.external_benchmarks,
            self.bertscore_model,
        ]


def evaluate_benchmark(
    model: SepitForConditionalGeneration,
    processor: SepitProcessor,
    rows: list[dict],
    args: EvaluationArguments,
    output_dir: Path,
    title: str,
    pure_llm: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    training: list[dict] | None = None,
) -> dict[str, dict]:
    """Answers of every system to `rows`, their scores, and the report files in `output_dir` (a staging folder).
    `pure_llm`: the PureLLM and its tokenizer, which answer as `PURE_LLM`; `training`: the train split's rows, which
    answer as `RETRIEVAL`."""
    retrieved = retrieve_answers(rows, training, args.retrieval_threshold) if training is not None else None
    answers = {
        system: generate_answers(
            *(pure_llm if system == PURE_LLM else (model, processor)),
            rows,
            system,
            args.batch_size,
            args.max_new_tokens,
        )
        for system in args.systems
    }
    if retrieved is not None:
        answers[RETRIEVAL] = [found.answer for found in retrieved]
    references = [row["answer"] for row in rows]
    types = [row["type"] for row in rows]
    results = {
        system: score_answers(
            predictions,
            references,
            types,
            [is_closed(kind) for kind in types],
            args.bertscore_model,
            args.bertscore_num_layers,
            protocol=args.protocol,
            questions=[row["question"] for row in rows],
        )
        for system, predictions in answers.items()
    }
    write_report(results, output_dir, title=title)
    if retrieved is not None:
        write_neighbours(rows, retrieved, output_dir, args.retrieval_threshold)
    write_jsonl(output_dir / "predictions.jsonl", prediction_records(rows, answers))
    return results


def training_rows(args: EvaluationArguments) -> list[dict] | None:
    """The train split's questions, from which the retrieval baseline answers; None when it is off (by default, when
    the dataset has no train split). Only the columns it reads: a SEPIT-Data train split is about a million rows."""
    if args.retrieval is False:
        return None
    if "train" not in get_dataset_split_names(args.dataset_name, args.dataset_config):
        if args.retrieval:
            raise ValueError(
                f"retrieval: {args.dataset_name} ({args.dataset_config}) has no train split to retrieve answers from; "
                "give the dataset the model was trained on, or --retrieval false"
            )
        return None
    columns = ["accession", "sequence", "type", "question", "answer"]
    return question_rows(args.dataset_name, args.dataset_config, "train").select_columns(columns).to_list()


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([EvaluationArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        # offline: a missing Hub model stops here, not after generating every answer (BERTScore comes last)
        require_local_or_cached(args.model_name_or_path, "model_name_or_path")
        require_local_or_cached(args.pure_llm_model_name_or_path, "pure_llm_model_name_or_path")
        require_local_or_cached(args.bertscore_model, "bertscore_model")
        processor = SepitProcessor.from_pretrained(args.model_name_or_path)
        model = SepitForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=args.dtype)
        model = model.to(args.device)
        pure_llm = None
        if args.pure_llm_model_name_or_path:
            pure_model, tokenizer = load_pure_llm(args.pure_llm_model_name_or_path, args.dtype)
            pure_llm = (pure_model.to(args.device), tokenizer)
        benchmarks = {"heldout": question_rows(args.dataset_name, args.dataset_config, args.split)}
        if args.external_benchmarks:
            benchmarks["instructprotein"] = question_rows(args.external_benchmarks, None, "test")
        training = training_rows(args)
    except (ValueError, OSError) as error:  # arguments, model or dataset
        print(f"evaluate: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    with atomic_folder(output_dir, WRITER, args.inputs, args.overwrite) as staging:
        for name, dataset in benchmarks.items():
            if args.max_samples is not None:
                dataset = dataset.select(range(min(args.max_samples, len(dataset))))
            with_structure = sum(source is not None for source in dataset["structure_source"])  # not the coordinates
            model_name = Path(args.model_name_or_path).name
            title = f"{name}: {model_name} on {len(dataset)} questions ({with_structure} with a structure)"
            (staging / name).mkdir()
            evaluate_benchmark(model, processor, dataset.to_list(), args, staging / name, title, pure_llm, training)
    for name in benchmarks:
        print(f"{name}: {output_dir / name / 'metrics.md'}")
        print((output_dir / name / "metrics.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
