"""Score answers generated earlier, with no model to load: the predictions that `training/evaluate.py` writes, or the
original SEPIT code's inference output, under either protocol (`corpus`, this project's; `sepit`, the paper's script):

    python training/score.py --predictions outputs/evaluation/heldout/predictions.jsonl --protocol sepit \\
        --output_dir outputs/evaluation-sepit/heldout
    python training/score.py --predictions qa_test_output.jsonl yn_test_output.jsonl --protocol sepit \\
        --output_dir outputs/original-rescored [--bertscore_model microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract]

Each file holds JSON lines of either format: this project's (`question`, `reference`, `type` and one answer per
system; `accession` optional) or the original's (`{"id", "conversation": [user, assistant], "response"}`, written by
its `inference_task.py`). Original-format rows answer as one system (`--original_system`), take their file's name as
question type, and are yes/no questions when the reference is Yes or No. A system's rows from several files are
scored together. A record that cannot be read is reported on stderr (file, line, reason) and skipped. Writes
`<output_dir>/metrics.{json,md,png}` at once, only over an earlier scoring's folder, an empty one or a new path (else
`--overwrite`), and prints the table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from modeling_sepit.atomic_folder import atomic_folder, check_output_path
from modeling_sepit.cli_sepit import script_parser
from modeling_sepit.evaluation_sepit import CLOSED_PREFIX, is_closed
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.metrics_sepit import PROTOCOLS, resolve_bertscore, score_answers, write_report

WRITER = "score"
# The fields of a record of `training/evaluate.py`'s predictions.jsonl that are no system's answer.
PROJECT_FIELDS = ("accession", "type", "question", "reference")
ORIGINAL_YES_NO = ("yes", "no")


class Answer(NamedTuple):
    """One system's answer to one question, with what scoring it takes."""

    prediction: str
    reference: str
    type: str
    closed: bool
    question: str


@dataclass
class ScoreArguments:
    """What to score and how."""

    predictions: list[str] = field(
        metadata={"help": "JSON-lines files: evaluate.py's predictions.jsonl or the original SEPIT inference output."}
    )
    output_dir: str = field(metadata={"help": "Folder for metrics.json, metrics.md and metrics.png."})
    protocol: str = field(default="corpus", metadata={"help": f"One of {list(PROTOCOLS)} (sepit: the paper's)."})
    original_system: str = field(
        default="original", metadata={"help": "The system the original-format rows answer as, in the report."}
    )
    bertscore_model: str | None = field(
        default=None,
        metadata={"help": "BERTScore model (name or folder); default: the bundled all-MiniLM-L6-v2; 'none' skips it."},
    )
    bertscore_num_layers: int | None = field(
        default=None, metadata={"help": "Layer BERTScore reads (corpus protocol only; sepit reads every layer)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir even if it holds something else than a scoring."}
    )

    def __post_init__(self) -> None:
        for path in self.predictions:
            if not Path(path).is_file():
                raise ValueError(f"predictions: {path} is not a file; give JSON-lines files of answers")
        if not self.original_system.strip():
            raise ValueError("original_system: empty; name the system the original-format rows answer as")
        self.bertscore_model, self.bertscore_num_layers = resolve_bertscore(
            self.bertscore_model, self.bertscore_num_layers, self.protocol
        )
        check_output_path(self.output_dir, WRITER, self.inputs, self.overwrite)

    @property
    def inputs(self) -> list[str | None]:
        """What the scoring reads: the output may not replace or lie inside any of them."""
        return [*self.predictions, self.bertscore_model]


def _text(record: dict[str, Any], key: str, name: str | None = None) -> str:
    """`record[key]` if it is a string; else a ValueError naming the field (`name`, or `key`)."""
    if key not in record:
        raise ValueError(f"{name or key}: missing")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{name or key}: a {type(value).__name__}, not a string")
    return value


def parse_record(record: Any, source: str, original_system: str) -> list[tuple[str, Answer]]:
    """(system, answer) pairs of one JSON record of either format; a ValueError naming the field when it cannot be
    scored. `source` (the file's name) is the question type of original-format rows."""
    if not isinstance(record, dict):
        raise ValueError(f"record: a JSON {type(record).__name__}, not an object")
    if "conversation" in record:  # the original's inference output
        conversation = record["conversation"]
        if not isinstance(conversation, list) or len(conversation) < 2:
            raise ValueError("conversation: not a list of a user turn and an assistant turn")
        turns = []
        for index, turn in enumerate(conversation[:2]):
            if not isinstance(turn, dict):
                raise ValueError(f"conversation[{index}]: a {type(turn).__name__}, not a turn object")
            turns.append(_text(turn, "content", f"conversation[{index}].content"))
        question, reference = turns
        response = _text(record, "response")
        closed = reference.lower() in ORIGINAL_YES_NO  # the original's yes/no task compares the lowercased reference
        kind = f"{CLOSED_PREFIX}{source}" if closed else source
        return [(original_system, Answer(response, reference, kind, closed, question))]
    question, reference, kind = (_text(record, key) for key in ("question", "reference", "type"))
    systems = {key: value for key, value in record.items() if key not in PROJECT_FIELDS}
    if not systems:
        raise ValueError(
            "record: no answer; a predictions record holds one field per system besides accession, type, question "
            "and reference (or it is an original-format record with conversation and response)"
        )
    closed = is_closed(kind)
    return [(system, Answer(_text(record, system), reference, kind, closed, question)) for system in systems]


def read_predictions(paths: list[str], original_system: str) -> tuple[dict[str, list[Answer]], int]:
    """Every system's answers in the files, in file and line order, and the number of records skipped; each skipped
    record is reported on stderr with its file, line and reason. A ValueError naming `predictions` when no record
    can be read at all."""
    answers: dict[str, list[Answer]] = {}
    skipped = 0
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                    pairs = parse_record(record, Path(path).stem, original_system)
                except ValueError as error:  # not UTF-8, not JSON, or fields that cannot be scored
                    print(f"score: {path}:{number}: {' '.join(str(error).split())}; skipped", file=sys.stderr)
                    skipped += 1
                    continue
                for system, answer in pairs:
                    answers.setdefault(system, []).append(answer)
    if not answers:
        raise ValueError(f"predictions: no readable record in {', '.join(paths)}")
    return answers, skipped


def score(rows: list[Answer], args: ScoreArguments) -> dict[str, Any]:
    """One system's `score_answers` dict."""
    return score_answers(
        [answer.prediction for answer in rows],
        [answer.reference for answer in rows],
        [answer.type for answer in rows],
        [answer.closed for answer in rows],
        args.bertscore_model,
        args.bertscore_num_layers,
        protocol=args.protocol,
        questions=[answer.question for answer in rows],
    )


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([ScoreArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        require_local_or_cached(args.bertscore_model, "bertscore_model")
        answers, skipped = read_predictions(args.predictions, args.original_system)
        results = {system: score(rows, args) for system, rows in answers.items()}
    except (ValueError, OSError) as error:  # arguments, files, no record to score, or references it cannot use
        print(f"score: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    title = f"{', '.join(Path(path).name for path in args.predictions)}: protocol {args.protocol}"
    output_dir = Path(args.output_dir)
    with atomic_folder(output_dir, WRITER, args.inputs, args.overwrite) as staging:
        write_report(results, staging, title=title)
    counts = ", ".join(f"{system} {len(rows)}" for system, rows in answers.items())
    print(f"score: answers scored: {counts}; {skipped} record(s) skipped")
    print((output_dir / "metrics.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
