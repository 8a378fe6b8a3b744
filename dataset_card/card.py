"""The dataset card: statistics gathered while building, rendered through `huggingface_hub.DatasetCard` from the
`README.md` template beside this file, and the push of a built folder to a Hub dataset repository."""

from __future__ import annotations

import bisect
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetInfo, Features, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from dataset_card.homology import CrossIdentity
from modeling_sepit.atomic_folder import MARKER

TEMPLATE = Path(__file__).resolve().parent / "README.md"
SPLITS = ("train", "validation", "test")
LENGTH_EDGES = (50, 100, 200, 300, 400, 500, 750, 1000, 1500, 2000)
_BAR_WIDTH = 40


@dataclass
class DatasetStatistics:
    """Counts per split, config and question type, sequence-length histogram and measured test-to-train identity;
    `structure_clusters` is how many homology clusters hold a protein with a structure (what the split can spread)."""

    threshold: float
    identity: dict[str, CrossIdentity]
    clusters_from: str | None = None
    cluster_engine: str = "pyopal"
    structure_clusters: int = 0
    problems: int = 0
    proteins: Counter = field(default_factory=Counter)
    with_structure: Counter = field(default_factory=Counter)
    rows: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    lengths: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_EDGES) + 1))
    yes_no_answers: Counter = field(default_factory=Counter)
    split_sizes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: defaultdict(dict))

    def add_protein(self, split: str, length: int, has_structure: bool) -> None:
        self.proteins[split] += 1
        self.with_structure[split] += int(has_structure)
        self.lengths[bisect.bisect_right(LENGTH_EDGES, length - 1)] += 1

    def add_row(self, config: str, split: str, kind: str, answer: str) -> None:
        self.rows[config][(split, kind)] += 1
        if kind.startswith("yes_no:"):
            self.yes_no_answers[answer] += 1

    def rows_in(self, config: str, split: str) -> int:
        return sum(count for (name, _), count in self.rows[config].items() if name == split)

    def yes_fraction(self) -> float:
        """Fraction of 'Yes' among the yes/no answers written."""
        total = sum(self.yes_no_answers.values())
        return self.yes_no_answers["Yes"] / total if total else 0.0

    def split_table(self) -> str:
        lines = ["| split | proteins | with structure | caption rows | instruction rows |", "|---|---|---|---|---|"]
        for split in SPLITS:
            lines.append(
                f"| {split} | {self.proteins[split]} | {self.with_structure[split]} | "
                f"{self.rows_in('captions', split)} | {self.rows_in('instructions', split)} |"
            )
        return "\n".join(lines)

    def type_table(self) -> str:
        kinds = sorted({kind for (_, kind) in self.rows["instructions"]})
        lines = ["| question type | " + " | ".join(SPLITS) + " |", "|---" * (len(SPLITS) + 1) + "|"]
        for kind in kinds:
            counts = " | ".join(str(self.rows["instructions"][split, kind]) for split in SPLITS)
            lines.append(f"| {kind} | {counts} |")
        return "\n".join(lines)

    def length_histogram(self) -> str:
        labels = [f"1-{LENGTH_EDGES[0]}"]
        labels += [f"{low + 1}-{high}" for low, high in zip(LENGTH_EDGES, LENGTH_EDGES[1:], strict=False)]
        labels.append(f"> {LENGTH_EDGES[-1]}")
        peak = max(self.lengths) or 1
        lines = ["| residues | proteins | |", "|---|---|---|"]
        for label, count in zip(labels, self.lengths, strict=True):
            lines.append(f"| {label} | {count} | `{'#' * round(_BAR_WIDTH * count / peak)}` |")
        return "\n".join(lines)

    def identity_text(self) -> str:
        parts = []
        for split, measured in self.identity.items():
            if measured.engine == "mmseqs":
                how = "best MMseqs2 easy-search hit against train, re-aligned with pyopal; pairs it skipped unmeasured"
                counted = "reported by the search"
            else:
                how = "exact" if measured.exact else "an upper bound: no pair's bound reached the measuring threshold"
                counted = "aligned in full"
            parts.append(
                f"- {split} vs train: maximum identity **{measured.max_identity:.2%}** ({how}; {measured.pairs} pairs, "
                f"{measured.aligned_pairs} {counted})"
            )
        return "\n".join(parts) or "- (a held-out split is empty: nothing to measure)"

    def summary(self) -> str:
        held_out = ", ".join(f"{split} {m.max_identity:.2%}" for split, m in self.identity.items())
        return (
            f"{self.split_table()}\n\n{self.type_table()}\n\n"
            f"max identity to train (threshold {self.threshold:.0%}): {held_out or 'n/a'}; clusters with a structure: "
            f"{self.structure_clusters}; problems reported: {self.problems}"
        )


def size_category(count: int) -> str:
    """The Hub's size_categories label for a dataset of `count` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return label
    return "1M<n<10M"


def declare_configs(
    card_data: DatasetCardData,
    features: dict[str, Features],
    split_sizes: dict[str, dict[str, tuple[int, int]]],
    default: str = "instructions",
) -> None:
    """Put into the card's YAML header each config's Parquet files, one entry per split that has rows (`load_dataset`
    refuses a declared split without data), and the split sizes (`split_sizes[config][split]` = rows, bytes).

    Split sizes in the YAML are what `load_dataset` checks the files against, and they enter its cache key: without
    them, two folders of the same name with these `configs` share one cache entry and the second loads the first's
    rows (datasets 5.2 hashes the config patterns, not the files they match)."""
    card_data.configs = [
        {
            "config_name": name,
            "default": name == default,
            "data_files": [{"split": split, "path": f"{name}/{split}-*.parquet"} for split in split_sizes[name]],
        }
        for name in features
        if split_sizes.get(name)
    ]
    DatasetInfosDict(
        {
            name: DatasetInfo(
                features=config_features,
                splits=SplitDict(
                    {
                        split: SplitInfo(split, num_bytes=size[1], num_examples=size[0])
                        for split, size in split_sizes[name].items()
                    }
                ),
                dataset_size=sum(size[1] for size in split_sizes[name].values()),
                config_name=name,
            )
            for name, config_features in features.items()
            if split_sizes.get(name)
        }
    ).to_dataset_card_data(card_data)


def write_card(folder: Path, statistics: DatasetStatistics, features: dict[str, Features]) -> DatasetCard:
    """Fill the template with this build's figures; the YAML header declares both configs and their Parquet files,
    each split that has rows, in train / validation / test order."""
    total_rows = sum(statistics.rows_in(name, split) for name in features for split in SPLITS)
    card_data = DatasetCardData(
        language="en",
        license="cc-by-4.0",
        pretty_name="SEPIT protein instructions",
        size_categories=size_category(total_rows),
        task_categories=["text-generation", "question-answering"],
        tags=["biology", "protein", "uniprot", "instruction-tuning"],
    )
    split_sizes = {
        name: {split: statistics.split_sizes[name][split] for split in SPLITS if split in statistics.split_sizes[name]}
        for name in features
    }
    declare_configs(card_data, features, split_sizes)
    if statistics.clusters_from:
        clusters = f"MMseqs2 clusters read from `{Path(statistics.clusters_from).name}`"
    elif statistics.cluster_engine == "mmseqs":
        clusters = (
            "MMseqs2 easy-linclust and easy-search of the corpus against itself, local identity over the shorter "
            "sequence, hits just below the threshold re-aligned with pyopal, fragments aligned with pyopal against "
            "every protein"
        )
    else:
        clusters = "all-vs-all alignment with pyopal (SIMD overlap alignment, BLOSUM62, gap open 10 / extend 1)"
    card = DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        split_table=statistics.split_table(),
        type_table=statistics.type_table(),
        length_histogram=statistics.length_histogram(),
        identity_threshold=f"{statistics.threshold:.0%}",
        identity_text=statistics.identity_text(),
        clusters=clusters,
        structure_clusters=statistics.structure_clusters,
        problems=statistics.problems,
        yes_fraction=f"{statistics.yes_fraction():.1%}",
        features="\n".join(
            f"- `{name}` columns: " + ", ".join(f"`{c}`" for c in config) for name, config in features.items()
        ),
    )
    card.save(folder / "README.md")
    return card


def push_dataset(
    folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False, commit_message: str = ""
) -> str:
    """Upload a built dataset folder (Parquet files + card) to a dataset repository; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not any(folder.glob("*/*.parquet")):
        raise ValueError(f"{folder}: not a built dataset folder (README.md and */*.parquet expected); run the builder")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="dataset",
        commit_message=commit_message or "Upload SEPIT protein instructions",
        ignore_patterns=[MARKER],  # local bookkeeping: which command wrote the folder
    )
    return str(commit)


def check_push_target(repo_id: str, command: str) -> None:
    """A `--push_to_hub` repo checked before anything is written: a valid id, and the Hub reachable (not offline)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"push_to_hub: {repo_id} is not a Hub repo id ({error})") from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"push_to_hub: HF_HUB_OFFLINE=1, so {repo_id} cannot be reached; {command} without --push_to_hub and push "
            "the folder later with dataset_card.card.push_dataset"
        )


def push_and_report(folder: Path, repo_id: str, private: bool, program: str) -> int:
    """A command's `--push_to_hub` step: push the written dataset and print where; a failure (network, token,
    permission) is one line naming the folder, which stays, and exit status 2."""
    try:
        url = push_dataset(folder, repo_id, private=private)
    except Exception as error:  # noqa: BLE001 - whatever the Hub says, the written dataset stays
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        print(
            f"{program}: error: push_to_hub: {reason[:300]}; the dataset is in {folder}, push it again with "
            "dataset_card.card.push_dataset",
            file=sys.stderr,
        )
        return 2
    print(f"pushed to {url}")
    return 0


__all__ = [
    "DatasetStatistics",
    "check_push_target",
    "declare_configs",
    "push_and_report",
    "push_dataset",
    "size_category",
    "write_card",
]
