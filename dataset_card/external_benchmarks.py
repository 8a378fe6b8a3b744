"""External yes/no benchmarks nobody here wrote: InstructProtein's downstream test sets (Wang et al. 2023,
HICAI-ZJU/InstructProtein, MIT), turned into closed questions in the layout of the `instructions` config.

- Metal-ion binding (`sequence<TAB>0/1`, from PEER/TorchDrug): "Does this protein bind metal ions?" -> Yes / No.
- GO molecular function (JSONL: `sequence`, `label`, `negative_labels` as GO ids): one question per (protein, term),
  Yes for a label, No for a negative label. The files give ids only and no GO ontology can be downloaded here, so a
  term is asked about only when its name is known from the bundled UniProt entries (their `DR GO` cross-references);
  the builder reports how many pairs that leaves.

Samples are drawn with a seed and balanced (as many Yes as No per benchmark).

    python -m dataset_card.external_benchmarks --output_dir outputs/instructprotein [--max_per_benchmark 100]
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from dataset_card.build_dataset import DATA, FEATURES
from modeling_sepit.atomic_folder import atomic_folder
from modeling_sepit.cli_sepit import script_parser
from modeling_sepit.structure_loading import check_sequence

INSTRUCTPROTEIN = DATA / "instructprotein"
METAL_FILE = INSTRUCTPROTEIN / "InstructProtein__test.txt"
GO_MF_FILE = INSTRUCTPROTEIN / "InstructProtein__test_mf.lm.json"
METAL_TYPE = "yes_no:instructprotein_metal_ion_binding"
GO_MF_TYPE = "yes_no:instructprotein_go_mf"
METAL_QUESTION = "<protein> Does this protein bind metal ions?"
GO_MF_QUESTION = "<protein> Does this protein have the molecular function '{name}' ({term})?"
_FLAT_GO = re.compile(r"^DR   GO; (GO:\d{7}); F:([^;]+);", re.MULTILINE)


@dataclass
class ExternalBenchmarkArguments:
    """Command-line arguments (parsed by transformers' HfArgumentParser)."""

    output_dir: str = field(metadata={"help": "Folder for the Parquet benchmark (split test)."})
    max_per_benchmark: int | None = field(
        default=None, metadata={"help": "Questions kept per benchmark (balanced Yes/No); default: all."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sample."})
    uniprot_dir: str = field(
        default=str(DATA / "uniprot"), metadata={"help": "UniProt files whose GO cross-references name the GO terms."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir even if it holds other files."})

    def __post_init__(self) -> None:
        if self.max_per_benchmark is not None and self.max_per_benchmark < 2:
            raise ValueError(f"max_per_benchmark must be at least 2 (one Yes, one No), got {self.max_per_benchmark}")
        if not Path(self.uniprot_dir).is_dir():
            raise ValueError(f"uniprot_dir: {self.uniprot_dir} is not a folder; give the UniProt files naming GO terms")


def go_term_names(uniprot_dir: str | Path) -> dict[str, str]:
    """GO molecular-function id -> name, from the `DR GO` lines of flat files and the GO cross-references of REST
    JSON files below `uniprot_dir` (gzip allowed)."""
    names: dict[str, str] = {}
    for path in sorted(Path(uniprot_dir).rglob("*")):
        if not path.is_file() or path.name == "SOURCES.md":
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        names.update(_FLAT_GO.findall(text))
        if text.lstrip().startswith("{"):
            try:
                results = json.loads(text).get("results", [])
            except (ValueError, AttributeError):
                continue
            for result in results:
                for reference in result.get("uniProtKBCrossReferences", []):
                    term = next((p["value"] for p in reference.get("properties", []) if p["key"] == "GoTerm"), "")
                    if reference.get("database") == "GO" and term.startswith("F:"):
                        names[reference["id"]] = term[2:]
    return names


def _row(benchmark: str, index: int, sequence: str, kind: str, question: str, answer: str, source: str) -> dict:
    return {
        "accession": f"{benchmark}-{index:05d}",
        "sequence": sequence,
        "coords": None,
        "coords_mask": None,
        "structure_source": None,
        "type": kind,
        "question": question,
        "answer": answer,
        "source_field": source,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


def metal_ion_binding_rows(path: Path = METAL_FILE) -> Iterator[dict]:
    """One question per protein of the metal-ion-binding test set."""
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        sequence, _, label = line.strip().partition("\t")
        if label not in ("0", "1"):
            raise ValueError(f"{path}:{index + 1}: expected 'sequence<TAB>0|1', got {line[:60]!r}")
        sequence = check_sequence(sequence, f"{path.name}:{index + 1}")
        answer = "Yes" if label == "1" else "No"
        yield _row("metal", index, sequence, METAL_TYPE, METAL_QUESTION, answer, "InstructProtein metal_ion_binding")


def go_mf_rows(names: dict[str, str], path: Path = GO_MF_FILE) -> Iterator[dict]:
    """One question per (protein, GO term with a known name): Yes for its labels, No for its negative labels."""
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        sequence = check_sequence(record["sequence"], f"{path.name}:{index + 1}")
        for key, answer in (("label", "Yes"), ("negative_labels", "No")):
            for term in record[key]:
                if term in names:
                    question = GO_MF_QUESTION.format(name=names[term], term=term)
                    yield _row("go_mf", index, sequence, GO_MF_TYPE, question, answer, f"InstructProtein {key}")


def balanced_sample(rows: list[dict], size: int | None, rng: random.Random) -> list[dict]:
    """`size` rows, half Yes and half No (all of the rarer answer if it has fewer), in their original order."""
    yes = [i for i, row in enumerate(rows) if row["answer"] == "Yes"]
    no = [i for i, row in enumerate(rows) if row["answer"] == "No"]
    per_answer = min(len(yes), len(no)) if size is None else min(len(yes), len(no), size // 2)
    keep = rng.sample(yes, per_answer) + rng.sample(no, per_answer)
    return [rows[i] for i in sorted(keep)]


def build_external_benchmarks(args: ExternalBenchmarkArguments) -> dict[str, int]:
    """Write the benchmarks as one Parquet `test` split with the `instructions` Features; return the rows per type."""
    rng = random.Random(args.seed)
    names = go_term_names(args.uniprot_dir)
    rows = balanced_sample(list(metal_ion_binding_rows()), args.max_per_benchmark, rng)
    rows += balanced_sample(list(go_mf_rows(names)), args.max_per_benchmark, rng)
    counts = {kind: sum(row["type"] == kind for row in rows) for kind in (METAL_TYPE, GO_MF_TYPE)}
    with atomic_folder(args.output_dir, "external_benchmarks", [args.uniprot_dir], args.overwrite) as staging:
        dataset = Dataset.from_list(rows, features=FEATURES["instructions"])
        dataset.to_parquet(str(staging / "test-00000-of-00001.parquet"))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([ExternalBenchmarkArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        counts = build_external_benchmarks(args)
    except ValueError as error:
        print(f"external_benchmarks: error: {error}", file=sys.stderr)
        return 2
    for kind, count in counts.items():
        print(f"{kind}: {count} questions")
    print(f"benchmarks written to {args.output_dir} (load_dataset(folder, split='test'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
