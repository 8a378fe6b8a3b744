"""Import the SEPIT-Data release (the original SEPIT code's `database/` folder) as this project's Parquet dataset.

Reads `pdb.h5` (a group per protein: `sequence`, `node_position`), `sequences.csv` (proteins without a structure),
`stage0/*.jsonl` ({id, caption}), `stage1/*.jsonl` and `stage2/*.jsonl` ({id, conversation}) and writes the
`captions` and `instructions` configs with the schema and Features of `dataset_card.build_dataset`, so that training
and evaluation take the folder unchanged. Splits come from the file names (train; valid -> validation; every other
file, such as qa_test and yn_test, its own split). Bad rows are reported with their reason and skipped. Memory does
not grow with the rows: lines are read one at a time, structures on demand, the sequences of `sequences.csv` from an
on-disk index, and Parquet is written in batches; what is kept is the ids of the distinct proteins per split (and,
for the audit, the sequences of test and training proteins). The card (source, licence, counts, and a
leakage audit of the release's own split) is written beside the data; the folder appears all at once.

    python -m dataset_card.import_sepit_data --input_dir database --output_dir sepit-data --licence apache-2.0
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import random
import re
import sqlite3
import sys
import tempfile
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from datasets.arrow_writer import ParquetWriter
from huggingface_hub import DatasetCard, DatasetCardData

from dataset_card.build_dataset import CONFIGS, FEATURES
from dataset_card.card import LENGTH_EDGES, check_push_target, declare_configs, push_and_report, size_category
from dataset_card.homology import nearest_identities
from dataset_card.instructions import CAPTION_TEMPLATES
from dataset_card.uniprot_reader import ReadProblem
from modeling_sepit.atomic_folder import atomic_folder
from modeling_sepit.cli_sepit import script_parser
from modeling_sepit.configuration_sepit import PROTEIN_TOKEN
from modeling_sepit.structure_loading import check_sequence

TEMPLATE = Path(__file__).resolve().parent / "sepit_data_card.md"
STAGES = {"stage0": "captions", "stage1": "captions", "stage2": "instructions"}
VALIDATION_NAMES = ("valid", "validation", "val", "dev")
ESM_MAX_RESIDUES = 1022  # what ESM-2 was trained on and the processor keeps by default
AUDIT_THRESHOLD = 0.3  # identities at or above it are measured exactly (homology.nearest_identities)
AUDIT_EDGES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
OPEN_ENDED, YES_NO = "open_ended", "yes_no:unlabelled"
_SPLIT_NAME = re.compile(r"\w+")  # what load_dataset accepts as a split name
_YES_NO = re.compile(r"(yes|no)[.!]?", re.IGNORECASE)
_ROLES = ("system", "user", "assistant")
_CACHED_PROTEINS = 4096
_BAR_WIDTH = 40


@dataclass
class ImportArguments:
    """Command-line arguments of the importer (parsed by transformers' HfArgumentParser)."""

    input_dir: str = field(metadata={"help": "The release's folder (the original code's database/)."})
    output_dir: str = field(
        metadata={"help": "Folder to write the dataset to (replaced atomically; new, empty, or an earlier import)."}
    )
    licence: str = field(
        default="unknown",
        metadata={"help": "The release's licence as it states it (a Hub licence id: apache-2.0, cc-by-4.0, ...)."},
    )
    source: str = field(default="U-rara/SEPIT-Data", metadata={"help": "Where the release came from (for the card)."})
    leakage_audit: bool = field(
        default=True, metadata={"help": "Measure each test protein's identity to training (time: test x train)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the request templates of stage-0-only captions."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Dataset repo id to upload the folder to."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir even if it holds something else than an earlier import."}
    )

    def __post_init__(self) -> None:
        folder = Path(self.input_dir)
        if not folder.is_dir():
            raise ValueError(f"input_dir: {self.input_dir} is not a folder; give the release's database/ folder")
        if not (folder / "stage2").is_dir() or not any((folder / "stage2").glob("*.jsonl")):
            raise ValueError(
                f"input_dir: {self.input_dir} has no stage2/*.jsonl; give the release's database/ folder (git lfs "
                "clone https://huggingface.co/datasets/U-rara/SEPIT-Data)"
            )
        if not (folder / "pdb.h5").is_file() and not (folder / "sequences.csv").is_file():
            raise ValueError(f"input_dir: {self.input_dir} has neither pdb.h5 nor sequences.csv: no protein to read")
        for path in release_files(folder):
            split_name(path)  # every file's split, before anything is written
        if not self.licence.strip() or any(char.isspace() for char in self.licence):
            raise ValueError(f"licence: {self.licence!r} is not a licence id; give one word such as apache-2.0")
        if self.push_to_hub:
            check_push_target(self.push_to_hub, "import")


def release_files(folder: Path) -> list[Path]:
    """The release's row files, stage by stage: stage 1 before stage 0, whose captions it may already carry."""
    return [path for stage in ("stage1", "stage0", "stage2") for path in sorted((folder / stage).glob("*.jsonl"))]


def split_name(path: Path) -> str:
    """The split of a release file: train -> train, valid -> validation, any other file its own (qa_test, yn_test:
    open-ended and yes/no tests stay apart)."""
    stem = path.stem
    if stem in VALIDATION_NAMES:
        return "validation"
    if not _SPLIT_NAME.fullmatch(stem):
        renamed = re.sub(r"\W", "_", stem)
        raise ValueError(
            f"input_dir: {path} cannot name a split (letters, digits and '_' only); rename it, e.g. {renamed}.jsonl"
        )
    return stem


class SkippedRow(Exception):
    """A row that cannot go into the dataset; its message is the reported reason ('kind: detail')."""


@dataclass
class ImportReport:
    """Rows imported and skipped per file, and why. Each skip goes to `on_skip` as it happens (the command line
    prints it), and the first `keep` are kept, so a release with many bad rows is reported in full in bounded memory."""

    on_skip: Callable[[ReadProblem], None] | None = None
    keep: int = 10_000
    imported: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    problems: list[ReadProblem] = field(default_factory=list)

    def skip(self, file: str, entry: str, reason: str) -> None:
        problem = ReadProblem(file, entry, reason)
        self.skipped[file] += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.problems) < self.keep:
            self.problems.append(problem)
        if self.on_skip:
            self.on_skip(problem)


@dataclass(frozen=True)
class Protein:
    """One protein's dataset columns, ready to write (coordinates as lists: converted once per protein)."""

    sequence: str
    coords: list[list[float]] | None
    source: str | None

    def columns(self, accession: str) -> dict:
        return {
            "accession": accession,
            "sequence": self.sequence,
            "coords": self.coords,
            "coords_mask": [True] * len(self.sequence) if self.coords is not None else None,
            "structure_source": self.source,
        }


def _h5py() -> ModuleType:
    """h5py, imported when a release is read (not for `--help`); it comes with the `train` extra."""
    try:
        import h5py
    except ImportError as error:
        raise ValueError("input_dir: reading pdb.h5 needs h5py: pip install 'sepit-hf[train]' (or h5py)") from error
    return h5py


class ProteinStore:
    """The proteins of `pdb.h5` and `sequences.csv` by id, read on demand: HDF5 groups when asked for, the CSV through
    an SQLite index on disk (`index`), the last few thousand answers cached (rows of one protein are usually
    together)."""

    def __init__(self, folder: Path, index: Path, report: ImportReport) -> None:
        h5 = folder / "pdb.h5"
        self.h5 = _h5py().File(h5, "r") if h5.is_file() else None
        self.db = sqlite3.connect(index)
        self.db.execute("CREATE TABLE sequences (id TEXT PRIMARY KEY, sequence TEXT)")
        if (folder / "sequences.csv").is_file():
            self._index_csv(folder / "sequences.csv", report)
        self.cache: OrderedDict[str, Protein | str] = OrderedDict()

    def _index_csv(self, path: Path, report: ImportReport) -> None:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"id", "sequence"} <= set(reader.fieldnames):
                raise ValueError(f"input_dir: {path} has no 'id,sequence' header (found {reader.fieldnames})")
            for number, row in enumerate(reader, start=2):
                if not row["id"] or not row["sequence"]:
                    report.skip(path.name, f"line {number}", "malformed csv row: an id and a sequence expected")
                    continue
                inserted = self.db.execute(
                    "INSERT OR IGNORE INTO sequences VALUES (?, ?)", (row["id"], row["sequence"])
                )
                if not inserted.rowcount:
                    report.skip(path.name, f"line {number}, id {row['id']}", "duplicate id: its first row is kept")
        self.db.commit()

    def close(self) -> None:
        self.db.close()
        if self.h5 is not None:
            self.h5.close()

    def get(self, protein_id: str) -> Protein:
        """The protein, or SkippedRow with the reason it cannot be used."""
        found = self.cache.get(protein_id)
        if found is None:
            try:
                found = self._read(protein_id)
            except SkippedRow as error:
                found = str(error)
            self.cache[protein_id] = found
            if len(self.cache) > _CACHED_PROTEINS:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(protein_id)
        if isinstance(found, str):
            raise SkippedRow(found)
        return found

    def _read(self, protein_id: str) -> Protein:
        group = self.h5.get(protein_id) if self.h5 is not None else None
        if isinstance(group, _h5py().Group) and group.name == f"/{protein_id}":  # not "." (the root) nor a path
            return _structure_protein(protein_id, group)
        row = self.db.execute("SELECT sequence FROM sequences WHERE id = ?", (protein_id,)).fetchone()
        if row is None:
            raise SkippedRow(f"unknown id: {protein_id!r} is in neither pdb.h5 nor sequences.csv")
        return Protein(_checked_sequence(row[0], "sequences.csv"), None, None)


def _checked_sequence(sequence: str, where: str) -> str:
    try:
        return check_sequence(sequence, where)
    except ValueError as error:
        raise SkippedRow(f"bad sequence: {error}") from None


def _structure_protein(protein_id: str, group) -> Protein:
    """A pdb.h5 group as the original reads it: `sequence[0]` decoded, `node_position` one C-alpha row per residue."""
    try:
        sequence = group["sequence"][()][0]
        coords = np.asarray(group["node_position"][()], dtype=np.float32)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise SkippedRow(f"malformed pdb.h5 group: {error}; 'sequence' and 'node_position' (L, 3) expected") from None
    sequence = _checked_sequence(sequence.decode() if isinstance(sequence, bytes) else str(sequence), "pdb.h5")
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise SkippedRow(f"malformed pdb.h5 group: node_position has shape {coords.shape}, (L, 3) expected")
    if len(coords) != len(sequence):
        raise SkippedRow(
            f"length mismatch: the sequence has {len(sequence)} residues, node_position {len(coords)} rows"
        )
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1))
    if bad.size:
        raise SkippedRow(f"non-finite coordinates: node_position rows {bad[:5].tolist()} ({bad.size} in all)")
    return Protein(sequence, coords.tolist(), f"pdb.h5:{protein_id}")


def checked_conversation(value: object) -> list[dict[str, str]]:
    """The conversation as `messages`; SkippedRow unless it is turns of role and text with an answer after a user
    turn and exactly one `<protein>` (the row names one protein), in a user turn."""
    if not isinstance(value, list) or not value:
        raise SkippedRow("empty conversation: a list of {role, content} turns expected")
    messages = []
    for number, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES or not isinstance(turn.get("content"), str):
            raise SkippedRow(f"malformed conversation: turn {number} is not {{role: user/assistant, content: text}}")
        if not turn["content"].strip():
            raise SkippedRow(f"empty conversation: turn {number} ({turn['role']}) has no text")
        messages.append({"role": turn["role"], "content": turn["content"]})
    tags = [message["content"].count(PROTEIN_TOKEN) for message in messages]
    if sum(tags) != 1:
        raise SkippedRow(f"<protein> count mismatch: {sum(tags)} placeholders, the row names one protein")
    asked = tags.index(1)
    if messages[asked]["role"] != "user":
        raise SkippedRow(f"<protein> count mismatch: the placeholder is in a {messages[asked]['role']} turn")
    if asked + 1 == len(messages) or messages[asked + 1]["role"] != "assistant":
        raise SkippedRow("malformed conversation: no assistant answer after the <protein> question")
    return messages


def _json_rows(path: Path, report: ImportReport) -> Iterator[tuple[str, dict]]:
    """(where, object) per non-blank line; lines that are not a JSON object with a string id are reported."""
    name = _name(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                report.skip(name, f"line {number}", f"not JSON: {error}")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
                report.skip(name, f"line {number}", "no id: a JSON object with a string 'id' expected")
                continue
            yield f"line {number}, id {row['id']}", row


def _name(path: Path) -> str:
    """A release file as the report and the card name it: stage2/qa_test.jsonl."""
    return f"{path.parent.name}/{path.name}"


@dataclass
class ImportStatistics:
    """What was written: rows per config and split, question types, distinct proteins per split, lengths."""

    rows: Counter = field(default_factory=Counter)  # (config, split) -> rows
    types: Counter = field(default_factory=Counter)  # (split, type) -> instruction rows
    proteins: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # split -> ids
    structured: set[str] = field(default_factory=set)
    long_chains: set[str] = field(default_factory=set)
    lengths: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_EDGES) + 1))
    yes_no: Counter = field(default_factory=Counter)
    multi_turn: int = 0
    split_sizes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, config: str, split: str, protein_id: str, protein: Protein) -> None:
        self.rows[config, split] += 1
        if any(protein_id in ids for ids in self.proteins.values()):
            self.proteins[split].add(protein_id)
            return
        self.proteins[split].add(protein_id)
        self.lengths[bisect.bisect_right(LENGTH_EDGES, len(protein.sequence) - 1)] += 1
        if protein.coords is not None:
            self.structured.add(protein_id)
        if len(protein.sequence) > ESM_MAX_RESIDUES:
            self.long_chains.add(protein_id)

    def splits(self) -> list[str]:
        """Splits in the order train, validation, then the others by name."""
        order = {"train": 0, "validation": 1}
        return sorted(self.proteins, key=lambda split: (order.get(split, 2), split))


class _Writers:
    """One Parquet file per (config, split), opened at its first row, with the config's Features embedded."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.writers: dict[tuple[str, str], ParquetWriter] = {}

    def write(self, config: str, split: str, row: dict) -> None:
        writer = self.writers.get((config, split))
        if writer is None:
            (self.staging / config).mkdir(exist_ok=True)
            path = self.staging / config / f"{split}-00000-of-00001.parquet"
            writer = self.writers[config, split] = ParquetWriter(features=FEATURES[config], path=str(path))
        writer.write(row)

    def close(self, statistics: ImportStatistics) -> None:
        for (config, split), writer in self.writers.items():
            statistics.split_sizes[config][split] = writer.finalize()  # (rows, bytes), for the card's info
            writer.close()


def _caption_key(split: str, protein_id: str, caption: str) -> bytes:
    return hashlib.blake2b(f"{split}\0{protein_id}\0{caption}".encode(), digest_size=16).digest()


def _import_rows(
    folder: Path, store: ProteinStore, writers: _Writers, statistics: ImportStatistics, report: ImportReport, seed: int
) -> None:
    """Stream every release file into the writers. Stage-1 captions are remembered (on disk, as hashes) so that a
    stage-0 caption a stage-1 row already carries is not written twice."""
    rng = random.Random(seed)
    store.db.execute("CREATE TABLE captions (key BLOB PRIMARY KEY)")
    for path in release_files(folder):
        stage, split, name = path.parent.name, split_name(path), _name(path)
        config = STAGES[stage]
        for where, row in _json_rows(path, report):
            protein_id = row["id"]
            try:
                protein = store.get(protein_id)
                if stage == "stage0":
                    caption = row.get("caption")
                    if not isinstance(caption, str) or not caption.strip():
                        raise SkippedRow("empty caption: a non-empty 'caption' text expected")
                    if PROTEIN_TOKEN in caption:
                        raise SkippedRow("<protein> count mismatch: the caption holds a placeholder")
                    key = _caption_key(split, protein_id, caption)
                    if store.db.execute("SELECT 1 FROM captions WHERE key = ?", (key,)).fetchone():
                        report.imported[name] += 1  # carried by the stage-1 row of the same caption
                        continue
                    request = {"role": "user", "content": rng.choice(CAPTION_TEMPLATES)}
                    messages = [request, {"role": "assistant", "content": caption}]
                else:
                    messages = checked_conversation(row.get("conversation"))
            except SkippedRow as error:
                report.skip(name, where, str(error))
                continue
            columns = protein.columns(protein_id)
            if config == "captions":
                if stage == "stage1":
                    caption = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
                    store.db.execute(
                        "INSERT OR IGNORE INTO captions VALUES (?)", (_caption_key(split, protein_id, caption),)
                    )
                fields = {"protein_name": None, "organism": None, "caption": caption, "messages": messages}
            else:
                asked = next(i for i, message in enumerate(messages) if PROTEIN_TOKEN in message["content"])
                question, answer = messages[asked]["content"], messages[asked + 1]["content"]
                kind = YES_NO if _YES_NO.fullmatch(answer.strip()) else OPEN_ENDED
                fields = {"type": kind, "question": question, "answer": answer, "source_field": name}
                fields["messages"] = messages
                statistics.types[split, kind] += 1
                statistics.multi_turn += sum(message["role"] == "assistant" for message in messages) > 1
                if kind == YES_NO:
                    statistics.yes_no[answer.strip().rstrip(".!").lower()] += 1
            writers.write(config, split, {**columns, **fields})
            statistics.add(config, split, protein_id, protein)
            report.imported[name] += 1
        store.db.commit()


@dataclass(frozen=True)
class AuditRow:
    """One test protein, its closest training protein and their identity (`exact`: see homology.Nearest)."""

    protein: str
    splits: tuple[str, ...]
    nearest: str | None
    identity: float
    exact: bool


def leakage_audit(statistics: ImportStatistics, store: ProteinStore, threads: int | None = None) -> list[AuditRow]:
    """For every protein of a test split (a split other than train and validation), the highest identity to any
    protein of a train split (`homology.nearest_identities` at `AUDIT_THRESHOLD`)."""
    tested: dict[str, list[str]] = defaultdict(list)
    for split in statistics.splits():
        if split not in ("train", "validation"):
            for protein_id in sorted(statistics.proteins[split]):
                tested[protein_id].append(split)
    training = sorted(statistics.proteins.get("train", ()))
    if not tested or not training:
        return []
    queries = list(tested)
    found = nearest_identities(
        [store.get(i).sequence for i in queries], [store.get(i).sequence for i in training], AUDIT_THRESHOLD, threads
    )
    return [
        AuditRow(i, tuple(tested[i]), training[n.reference] if n.reference is not None else None, n.identity, n.exact)
        for i, n in zip(queries, found, strict=True)
    ]


def _bars(labels: list[str], counts: list[int], what: str) -> str:
    peak = max(counts, default=0) or 1
    lines = [f"| {what} | proteins | |", "|---|---|---|"]
    for label, count in zip(labels, counts, strict=True):
        lines.append(f"| {label} | {count} | `{'#' * round(_BAR_WIDTH * count / peak)}` |")
    return "\n".join(lines)


def _length_histogram(statistics: ImportStatistics) -> str:
    labels = [f"1-{LENGTH_EDGES[0]}"]
    labels += [f"{low + 1}-{high}" for low, high in zip(LENGTH_EDGES, LENGTH_EDGES[1:], strict=False)]
    return _bars([*labels, f"> {LENGTH_EDGES[-1]}"], statistics.lengths, "residues")


def audit_histogram(audit: list[AuditRow]) -> str:
    """Test proteins per band of highest identity to training (bounded values all fall below the first edge)."""
    counts = [0] * (len(AUDIT_EDGES) + 1)
    for row in audit:
        counts[bisect.bisect_right(AUDIT_EDGES, row.identity) if row.exact else 0] += 1
    labels = [f"< {AUDIT_EDGES[0]:.0%}"]
    labels += [f"{low:.0%}-{high:.0%}" for low, high in zip(AUDIT_EDGES, AUDIT_EDGES[1:], strict=False)]
    return _bars([*labels, "100% (identical)"], counts, "identity to training")


def audit_table(audit: list[AuditRow], splits: list[str]) -> str:
    """Per test split and for all: proteins, and the fraction with a training neighbour at >= 50% and >= 90%."""
    lines = ["| test split | proteins | median highest identity | >= 50% | >= 90% |", "|---|---|---|---|---|"]
    for name, rows in [(split, [r for r in audit if split in r.splits]) for split in splits] + [("all", audit)]:
        if not rows:
            continue
        identities = [r.identity if r.exact else 0.0 for r in rows]
        median = f"{np.median(identities):.1%}" if np.median(identities) >= AUDIT_THRESHOLD else "< 30%"
        at = [sum(value >= cut for value in identities) / len(rows) for cut in (0.5, 0.9)]
        lines.append(f"| {name} | {len(rows)} | {median} | {at[0]:.1%} | {at[1]:.1%} |")
    return "\n".join(lines)


def _write_audit_tsv(path: Path, audit: list[AuditRow]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("protein\ttest_splits\tnearest_training_protein\tidentity\texact\n")
        for row in audit:
            nearest = row.nearest or ""
            handle.write(f"{row.protein}\t{','.join(row.splits)}\t{nearest}\t{row.identity:.4f}\t{row.exact}\n")


@dataclass
class ImportResult:
    """What an import wrote and measured (also rendered into the card)."""

    output_dir: Path
    statistics: ImportStatistics
    report: ImportReport
    audit: list[AuditRow] | None

    def summary(self) -> str:
        rows = self.statistics.rows
        lines = [
            f"{config} {split}: {rows[config, split]} rows"
            for split in self.statistics.splits()
            for config in CONFIGS
            if rows[config, split]
        ]
        lines.append(f"skipped rows: {sum(self.report.skipped.values())} ({dict(self.report.reasons)})")
        if self.audit:
            close = sum(row.identity >= 0.5 and row.exact for row in self.audit)
            lines.append(f"leakage audit: {close} of {len(self.audit)} test proteins have a training protein at >= 50%")
        return "\n".join(lines)


def _tables(result: ImportResult) -> dict[str, str]:
    statistics, report = result.statistics, result.report
    splits = statistics.splits()
    split_lines = ["| split | proteins | with structure | caption rows | instruction rows |", "|---|---|---|---|---|"]
    for split in splits:
        ids = statistics.proteins[split]
        rows = " | ".join(str(statistics.rows[config, split]) for config in CONFIGS)
        split_lines.append(f"| {split} | {len(ids)} | {len(ids & statistics.structured)} | {rows} |")
    kinds = sorted({kind for _, kind in statistics.types})
    type_lines = ["| question type | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for kind in kinds:
        type_lines.append(f"| {kind} | " + " | ".join(str(statistics.types[split, kind]) for split in splits) + " |")
    problem_lines = ["| file | rows imported | rows skipped |", "|---|---|---|"]
    for file in sorted(set(report.imported) | set(report.skipped)):
        problem_lines.append(f"| `{file}` | {report.imported[file]} | {report.skipped[file]} |")
    problem_lines += ["", "| reason | rows |", "|---|---|"]
    problem_lines += [f"| {reason} | {count} |" for reason, count in report.reasons.most_common()]
    yes_no = sum(statistics.yes_no.values())
    if result.audit is None:
        audit = {"audit_table": "Not run for this import (`--leakage_audit false`).", "audit_histogram": ""}
        audit["audit_closest"] = ""
    elif not result.audit:
        audit = {"audit_table": "No test split or no train split: nothing to measure.", "audit_histogram": ""}
        audit["audit_closest"] = ""
    else:
        closest = sorted(result.audit, key=lambda row: -row.identity)[:10]
        audit = {
            "audit_table": audit_table(result.audit, [s for s in splits if s not in ("train", "validation")]),
            "audit_histogram": audit_histogram(result.audit),
            "audit_closest": "The closest pairs:\n\n| test protein | test splits | training protein | identity |\n"
            "|---|---|---|---|\n"
            + "\n".join(
                f"| {r.protein} | {', '.join(r.splits)} | {r.nearest or '-'} | "
                + (f"{r.identity:.1%}" if r.exact else "< 30%")
                + " |"
                for r in closest
            ),
        }
    return {
        "split_table": "\n".join(split_lines),
        "type_table": "\n".join(type_lines),
        "problem_table": "\n".join(problem_lines),
        "yes_fraction": f"{statistics.yes_no['yes'] / yes_no:.1%}" if yes_no else "n/a (no yes/no question)",
        "length_histogram": _length_histogram(statistics),
        **audit,
    }


def write_card(folder: Path, result: ImportResult, args: ImportArguments) -> DatasetCard:
    """The card through `DatasetCard.from_template`: YAML with the configs, splits and sizes, then the figures."""
    card_data = DatasetCardData(
        language="en",
        license=args.licence,
        pretty_name="SEPIT-Data (imported)",
        size_categories=size_category(sum(result.statistics.rows.values())),
        task_categories=["text-generation", "question-answering"],
        tags=["biology", "protein", "instruction-tuning", "sepit"],
    )
    splits, written = result.statistics.splits(), result.statistics.split_sizes
    sizes = {
        config: {split: written[config][split] for split in splits if split in written[config]} for config in written
    }
    declare_configs(card_data, FEATURES, sizes)
    card = DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        source=args.source,
        licence=args.licence,
        problems=sum(result.report.skipped.values()),
        multi_turn=result.statistics.multi_turn,
        long_chains=len(result.statistics.long_chains),
        audit_threshold=f"{AUDIT_THRESHOLD:.0%}",
        features="\n".join(
            f"- `{name}` columns: " + ", ".join(f"`{c}`" for c in config) for name, config in FEATURES.items()
        ),
        **_tables(result),
    )
    card.save(folder / "README.md")
    return card


def import_sepit_data(args: ImportArguments, report: ImportReport | None = None) -> ImportResult:
    """Import the release into a staging folder, audit, write the card, and move the folder into place. Skipped rows
    go to `report` (pass one in to see them as they happen)."""
    report = report if report is not None else ImportReport()
    folder = Path(args.input_dir)
    statistics = ImportStatistics()
    with (
        atomic_folder(args.output_dir, "import_sepit_data", [args.input_dir], args.overwrite) as staging,
        tempfile.TemporaryDirectory(dir=staging) as scratch,
    ):
        store = ProteinStore(folder, Path(scratch) / "index.sqlite", report)
        try:
            writers = _Writers(staging)
            try:
                _import_rows(folder, store, writers, statistics, report, args.seed)
            finally:
                writers.close(statistics)
            if "train" not in statistics.split_sizes["instructions"]:
                raise ValueError(
                    f"input_dir: no stage2 train row could be imported ({sum(report.skipped.values())} rows skipped: "
                    f"{dict(report.reasons)}); the dataset could not train"
                )
            audit = leakage_audit(statistics, store) if args.leakage_audit else None
        finally:
            store.close()
        result = ImportResult(Path(args.output_dir), statistics, report, audit)
        if audit:
            _write_audit_tsv(staging / "leakage_audit.tsv", audit)
        write_card(staging, result, args)
    return result


def _print_problem(problem: ReadProblem) -> None:
    print(f"skipped {problem.file} [{problem.entry}]: {problem.reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([ImportArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        result = import_sepit_data(args, ImportReport(on_skip=_print_problem))
    except (ValueError, OSError) as error:
        print(f"import_sepit_data: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"dataset written to {result.output_dir}")
    if args.push_to_hub:
        return push_and_report(result.output_dir, args.push_to_hub, args.private, "import_sepit_data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
