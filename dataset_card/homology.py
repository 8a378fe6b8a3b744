"""Homology-controlled train/validation/test splits: no test protein may share >= 50% sequence identity with a
training protein, and the builder reports the largest test-to-train identity it measured.

Method. The identity of two proteins is the number of identical aligned residues divided by the length of the
shorter one (CD-HIT's definition), read from an overlap alignment (end gaps free on both sequences) with BLOSUM62,
gap open 10 and gap extend 1 (a gap of n residues costs 10 + (n - 1)). The aligner is pyopal, Python bindings to
Opal: SIMD Needleman-Wunsch / overlap / Smith-Waterman alignment of one query against many targets at once. So that the
value is symmetric, the longer sequence (the larger by `(length, sequence)`) is always the query. Co-optimal
alignments can differ in identity; the one pyopal's traceback returns counts.

Speed without approximation. Two upper bounds on the identity rule pairs out before any traceback:
1. Longest common subsequence: pyopal's fast score-only mode with an identity scoring matrix (1 for equal letters, 0
   otherwise) and zero gap penalties scores the LCS, and no alignment can pair more identical residues than that.
   It only rules out pairs of similar length (against a protein twice as long, nearly every residue of the shorter
   one finds an equal letter), so only those pairs are given it.
2. Score gap: the alignment A that pyopal returns scores S, the optimal overlap score under BLOSUM62 (pyopal may
   start A past the first residue of both sequences, so A is always a valid local alignment, not always a valid
   overlap one). Under BLOSUM62 plus 1 on the diagonal A scores S + identities(A), so the best local
   (Smith-Waterman) score L under that matrix gives identities(A) <= L - S. Two score-only passes, far tighter.
Only pairs whose bounds reach the threshold are aligned with traceback, so the result is that of aligning every pair
(checked against exhaustive alignment on the demo corpus) at a fraction of the cost.

Proteins are clustered as connected components (single linkage) of the pairs at or above the threshold, and whole
clusters go to one split, which is what guarantees the split property; the clusters holding a protein with a
structure are spread over the splits first, so that each split has some. All-pairs alignment is quadratic; at
Swiss-Prot scale, cluster with MMseqs2 instead (dataset_card/mmseqs.py, `build_dataset --cluster_engine mmseqs`,
which uses `linked_pairs` and `pair_identities` from here to keep this module's definition of the 50% rule; or read
clusters made elsewhere with `read_cluster_tsv`).
"""

from __future__ import annotations

import bisect
import math
import os
import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pyopal
from scoring_matrices import ScoringMatrix

DEFAULT_THRESHOLD = 0.5
SPLITS = ("train", "validation", "test")
GAP_OPEN = 10
GAP_EXTEND = 1

_BLOSUM62 = ScoringMatrix.from_name("BLOSUM62")
_ALPHABET = _BLOSUM62.alphabet
# pyopal cannot encode the stop symbol '*' of BLOSUM62's alphabet, so it is treated like any unknown letter.
_RESIDUES = frozenset(_ALPHABET) - {"*"}
_RARE = str.maketrans({"U": "C", "O": "K"})  # selenocysteine, pyrrolysine -> their canonical parents
_SIZE = len(_ALPHABET)
_EQUAL_LETTERS = ScoringMatrix([[int(i == j) for j in range(_SIZE)] for i in range(_SIZE)], alphabet=_ALPHABET)
_BLOSUM62_PLUS_EQUAL = ScoringMatrix(
    [[int(_BLOSUM62[i][j]) + (i == j) for j in range(_SIZE)] for i in range(_SIZE)], alphabet=_ALPHABET
)
_LCS = pyopal.Aligner(_EQUAL_LETTERS, gap_open=0, gap_extend=0)
_ALIGN = pyopal.Aligner(_BLOSUM62, gap_open=GAP_OPEN, gap_extend=GAP_EXTEND)
_ALIGN_PLUS_EQUAL = pyopal.Aligner(_BLOSUM62_PLUS_EQUAL, gap_open=GAP_OPEN, gap_extend=GAP_EXTEND)
# The LCS bound is given only to pairs whose longer sequence is less than this many times the shorter: on the demo
# corpus it ruled out 97% of those, 13% of the pairs with length ratio 2 to 4 and none above 4.
_MAX_LENGTH_RATIO_FOR_LCS = 2
# A pyopal call vectorises over its targets: with fewer than this many, most SIMD lanes sit idle.
_MIN_TARGETS_PER_CALL = 64
# Long jobs are cut so that each thread gets about this many pieces of the total work: the last ones finish together.
_PIECES_PER_THREAD = 4
# Queries screened and aligned between two union-find updates: more keeps the threads busy, fewer skips more pairs
# whose proteins are already in one cluster.
_QUERIES_PER_WAVE = 8


@dataclass(frozen=True)
class CrossIdentity:
    """The largest identity from any query to any reference, and how much of it was measured.

    `max_identity` is exact when `exact` is true. Otherwise every aligned pair scored lower than the bound of some
    pair the prefilters ruled out, and `max_identity` is that bound: an upper limit, still below the threshold.
    Counts are over distinct sequences; `aligned_pairs` are the pairs that got a full alignment. `engine` is what
    measured it: "pyopal" (this module), or "mmseqs" (dataset_card/mmseqs.py: the best hit of an MMseqs2 search,
    neither exact nor a bound, since pairs its prefilter skips are not measured).
    """

    max_identity: float
    exact: bool
    pairs: int
    aligned_pairs: int
    engine: str = "pyopal"


@dataclass(frozen=True)
class _Targets:
    """A pyopal database, the caller's id of each of its sequences and their lengths' prefix sums (to split work)."""

    database: pyopal.Database
    ids: Sequence[int]
    offsets: list[int]

    @classmethod
    def of(cls, sequences: Sequence[str]) -> _Targets:
        """Sequences whose ids are their positions: the one database every job of a call draws from."""
        offsets = list(accumulate(map(len, sequences), initial=0))
        return cls(pyopal.Database(sequences, _ALPHABET), range(len(sequences)), offsets)

    def subset(self, ids: Sequence[int]) -> _Targets:
        """The sequences with these ids, without encoding them again (ids must be positions, as `of` makes them)."""
        offsets = list(accumulate((self.length(i) for i in ids), initial=0))
        return _Targets(self.database.extract(ids), list(ids), offsets)

    def length(self, position: int) -> int:
        return self.offsets[position + 1] - self.offsets[position]


# One query (its id and sequence) against targets[start:end].
_Job = tuple[int, str, _Targets, int, int]
# What a worker thread computes for one piece of a job: (target position, value) per target.
_Measure = Callable[[str, _Targets, int, int], list[tuple[int, float]]]


class _UnionFind:
    """Disjoint sets with path halving: single-linkage clusters grow one aligned pair at a time."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, first: int, second: int) -> None:
        self.parent[self.find(first)] = self.find(second)


# ----------------------------------------------------------------------------------------------------------------
# validation and normalisation


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction of identical residues in (0, 1], got {threshold!r}")


def _thread_count(threads: int | None) -> int:
    if threads is None:
        return os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be a positive number of threads (or None for one per CPU), got {threads!r}")
    return threads


def _normalize(sequence: str) -> str:
    """Upper case, U -> C, O -> K, anything else outside BLOSUM62's letters -> X (pyopal rejects unknown letters)."""
    upper = sequence.upper().translate(_RARE)
    return "".join(letter if letter in _RESIDUES else "X" for letter in upper)


def _normalize_all(sequences: Iterable[str], argument: str) -> list[str]:
    normalized = []
    for index, sequence in enumerate(sequences):
        if not sequence:
            raise ValueError(f"{argument}[{index}] is empty: every protein needs at least one residue")
        normalized.append(_normalize(sequence))
    return normalized


def _order_key(sequence: str) -> tuple[int, str]:
    """Longer first, then by letters: the query of every pair, so that its identity does not depend on call order."""
    return len(sequence), sequence


def _count_too_short(ascending_lengths: Sequence[int], length: int) -> int:
    """How many of the sequences are too short for the LCS bound to rule them out against one of `length` residues."""
    return bisect.bisect_right(ascending_lengths, length // _MAX_LENGTH_RATIO_FOR_LCS)


# ----------------------------------------------------------------------------------------------------------------
# alignment: the measures a worker thread applies to one query and a range of targets


def _identity(result: pyopal.FullResult) -> float:
    return result.alignment.count("M") / min(result.query_length, result.target_length)


def _lcs_bound(query: str, targets: _Targets, start: int, end: int) -> list[tuple[int, float]]:
    """Longest common subsequence / shorter length: no alignment pairs more identical residues."""
    results = _LCS.align(query, targets.database, mode="score", algorithm="ov", start=start, end=end)
    return [(r.target_index, r.score / targets.length(r.target_index)) for r in results]


def _score_bound(query: str, targets: _Targets, start: int, end: int) -> list[tuple[int, float]]:
    """(Local score under BLOSUM62 + identity - overlap score under BLOSUM62) / shorter length: see the module doc."""
    overlap = _ALIGN.align(query, targets.database, mode="score", algorithm="ov", start=start, end=end)
    local = _ALIGN_PLUS_EQUAL.align(query, targets.database, mode="score", algorithm="sw", start=start, end=end)
    return [
        (o.target_index, (p.score - o.score) / targets.length(o.target_index))
        for o, p in zip(overlap, local, strict=True)
    ]


def _identities(query: str, targets: _Targets, start: int, end: int) -> list[tuple[int, float]]:
    """Identity from the BLOSUM62 overlap alignment with traceback."""
    results = _ALIGN.align(query, targets.database, mode="full", algorithm="ov", start=start, end=end)
    return [(r.target_index, _identity(r)) for r in results]


def _run(measure: _Measure, jobs: Sequence[_Job], pool: ThreadPool, threads: int) -> Iterator[tuple[int, int, float]]:
    """(query id, target id, value) for every pair of every job, computed on `pool`.

    A long job is cut into pieces of at least `_MIN_TARGETS_PER_CALL` targets and the pieces run largest first, so
    the longest query (a 38k-residue titin beside proteins of a few hundred) does not leave one thread working alone.
    """
    cells = [len(query) * (targets.offsets[end] - targets.offsets[start]) for _, query, targets, start, end in jobs]
    budget = max(1, sum(cells) // (threads * _PIECES_PER_THREAD))
    pieces = []
    for job, job_cells in zip(jobs, cells, strict=True):
        _, query, targets, start, end = job
        count = max(1, min(math.ceil(job_cells / budget), (end - start) // _MIN_TARGETS_PER_CALL))
        step = max(1, math.ceil((end - start) / count))
        for first in range(start, end, step):
            last = min(end, first + step)
            pieces.append((len(query) * (targets.offsets[last] - targets.offsets[first]), job, first, last))
    pieces.sort(key=lambda piece: piece[0], reverse=True)

    def work(piece: tuple[int, _Job, int, int]) -> tuple[_Job, list[tuple[int, float]]]:
        _, job, first, last = piece
        _, query, targets, _, _ = job
        return job, measure(query, targets, first, last)

    for (query_id, _, targets, _, _), values in pool.imap_unordered(work, pieces):
        for position, value in values:
            yield query_id, targets.ids[position], value


def _screen(
    measure: _Measure, jobs: Sequence[_Job], threshold: float, pool: ThreadPool, threads: int
) -> tuple[dict[int, list[int]], float]:
    """Target ids per query id whose bound reaches `threshold`, and the largest bound of the pairs ruled out."""
    survivors: dict[int, list[int]] = {}
    ruled_out = 0.0
    for query_id, target_id, bound in _run(measure, jobs, pool, threads):
        if bound >= threshold:
            survivors.setdefault(query_id, []).append(target_id)
        else:
            ruled_out = max(ruled_out, bound)
    return survivors, ruled_out


def _pair(first: str, second: str) -> tuple[str, str]:
    """One pair as the clustering sees it: normalised, the longer sequence first (it is the query)."""
    query, target = sorted(_normalize_all((first, second), "sequences"), key=_order_key, reverse=True)
    return query, target


def sequence_identity(first: str, second: str) -> float:
    """Identical aligned residues / shorter length of one pair, by the same alignment the clustering uses."""
    query, target = _pair(first, second)
    return 1.0 if query == target else _identities(query, _Targets.of([target]), 0, 1)[0][1]


def identity_bounds(first: str, second: str) -> tuple[float, float]:
    """The two upper bounds on `sequence_identity` that the prefilters use: (LCS bound, score-gap bound)."""
    query, target = _pair(first, second)
    database = _Targets.of([target])
    return _lcs_bound(query, database, 0, 1)[0][1], _score_bound(query, database, 0, 1)[0][1]


# ----------------------------------------------------------------------------------------------------------------
# clusters


def cluster_by_identity(
    sequences: Sequence[str], threshold: float = DEFAULT_THRESHOLD, threads: int | None = None
) -> list[int]:
    """Cluster id per sequence: connected components of the pairs with identity >= `threshold`.

    Single linkage is what the split needs: two proteins in different clusters are then always below the threshold.
    It also lets a short fragment join unrelated proteins (on the demo corpus two 11-residue fragments, at 6/11
    identity to many proteins, put 18 in one cluster): the split stays valid, only coarser; drop fragments first if
    that matters. Ids number clusters in order of first appearance; identical sequences share one without alignment.
    """
    _check_threshold(threshold)
    threads = _thread_count(threads)
    normalized = _normalize_all(sequences, "sequences")
    unique = sorted(set(normalized), key=_order_key, reverse=True)
    targets = _Targets.of(unique)
    forest = _UnionFind(len(unique))
    # every pair once, the longer sequence as query: unique[i] against the later (shorter) unique[i + 1:], of which
    # unique[cut[i]:] are too short for the LCS bound
    ascending = [len(sequence) for sequence in reversed(unique)]
    cut = [len(unique) - _count_too_short(ascending, len(sequence)) for sequence in unique]
    with ThreadPool(threads) as pool:
        jobs = [(i, unique[i], targets, i + 1, cut[i]) for i in range(len(unique)) if cut[i] > i + 1]
        similar_length, _ = _screen(_lcs_bound, jobs, threshold, pool, threads)
        for wave in range(0, len(unique), _QUERIES_PER_WAVE):
            jobs = []
            for i in range(wave, min(wave + _QUERIES_PER_WAVE, len(unique))):
                candidates = similar_length.get(i, []) + list(range(cut[i], len(unique)))
                unlinked = [j for j in candidates if forest.find(i) != forest.find(j)]
                if unlinked:
                    jobs.append((i, unique[i], targets.subset(unlinked), 0, len(unlinked)))
            close, _ = _screen(_score_bound, jobs, threshold, pool, threads)
            jobs = [(i, unique[i], targets.subset(ids), 0, len(ids)) for i, ids in close.items()]
            for i, j, identity in _run(_identities, jobs, pool, threads):
                if identity >= threshold:
                    forest.union(i, j)
    position = {sequence: index for index, sequence in enumerate(unique)}
    numbers: dict[int, int] = {}
    return [numbers.setdefault(forest.find(position[sequence]), len(numbers)) for sequence in normalized]


def read_cluster_tsv(path: str | Path, accessions: Sequence[str]) -> list[int]:
    """Cluster id per accession from the `representative<TAB>member` TSV of `mmseqs easy-cluster` (MMseqs2).

    For corpora where all-pairs alignment is too slow. An accession absent from the file is its own cluster; ids
    number clusters in order of first appearance in `accessions`.
    """
    expected = "expected 'representative<TAB>member' lines, each member once (the cluster TSV of mmseqs easy-cluster)"
    representative: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2 or not all(field.strip() for field in fields):
                raise ValueError(f"{path}, line {number}: {expected}, got {line.rstrip()!r}")
            head, member = fields
            if representative.setdefault(member, head) != head:
                raise ValueError(
                    f"{path}, line {number}: {expected}, but {member!r} was already in {representative[member]!r}"
                )
    numbers: dict[str, int] = {}
    return [numbers.setdefault(representative.get(accession, accession), len(numbers)) for accession in accessions]


# ----------------------------------------------------------------------------------------------------------------
# splits


def split_clusters(
    cluster_ids: Sequence[Hashable],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    with_structure: Sequence[bool] | None = None,
) -> list[str]:
    """'train' / 'validation' / 'test' per protein, whole clusters at a time, aiming at `fractions` of proteins.

    Clusters go largest first (ties in seeded random order) to the split furthest below its share. With three or
    more clusters, validation and test (when their fraction is not zero) get at least one cluster each, taken from
    the split with the most clusters, so a tiny corpus still yields a non-empty test set.

    `with_structure` (one flag per protein) stratifies the split: the clusters holding a protein with a structure are
    placed first, the same way among themselves, so that with three or more of them every held-out split has one and a
    "structure withheld" comparison on it measures something; the other clusters then fill each split up to its share.
    """
    if len(fractions) != len(SPLITS) or any(not 0.0 <= share <= 1.0 for share in fractions):
        raise ValueError(f"fractions must be three shares in [0, 1] for {SPLITS}, got {tuple(fractions)!r}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must sum to 1 (train, validation, test), got {tuple(fractions)!r}")
    if with_structure is not None and len(with_structure) != len(cluster_ids):
        raise ValueError(
            f"with_structure must have one flag per protein: {len(with_structure)} flags for {len(cluster_ids)} "
            "cluster ids"
        )
    sizes: dict[Hashable, int] = {}
    for cluster in cluster_ids:
        sizes[cluster] = sizes.get(cluster, 0) + 1
    order = list(sizes)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda cluster: sizes[cluster], reverse=True)
    structured: set[Hashable] = set()
    if with_structure is not None:
        structured = {cluster for cluster, flag in zip(cluster_ids, with_structure, strict=True) if flag}

    members: list[list[Hashable]] = [[] for _ in SPLITS]
    counts = [0] * len(SPLITS)
    first = [cluster for cluster in order if cluster in structured]
    first_proteins = sum(sizes[cluster] for cluster in first)
    _fill(first, sizes, [share * first_proteins for share in fractions], members, counts)
    if len(first) >= len(SPLITS):
        _give_held_out_splits_one(members, counts, sizes, fractions)
    rest = [cluster for cluster in order if cluster not in structured]
    _fill(rest, sizes, [share * len(cluster_ids) for share in fractions], members, counts)
    if len(order) >= len(SPLITS):
        _give_held_out_splits_one(members, counts, sizes, fractions)
    split_of = {cluster: SPLITS[k] for k, clusters in enumerate(members) for cluster in clusters}
    return [split_of[cluster] for cluster in cluster_ids]


def _fill(
    clusters: Sequence[Hashable],
    sizes: dict[Hashable, int],
    targets: Sequence[float],
    members: list[list[Hashable]],
    counts: list[int],
) -> None:
    """Each cluster, in order, to the split furthest below its target number of proteins (`counts` so far)."""
    for cluster in clusters:
        split = max(range(len(SPLITS)), key=lambda k: targets[k] - counts[k])
        members[split].append(cluster)
        counts[split] += sizes[cluster]


def _give_held_out_splits_one(
    members: list[list[Hashable]], counts: list[int], sizes: dict[Hashable, int], fractions: Sequence[float]
) -> None:
    """Validation and test, where their fraction is not zero, get a cluster if they have none: the smallest of the
    split holding the most (the caller makes sure there are three or more, so no split is left empty)."""
    for split in (1, 2):
        if fractions[split] > 0 and not members[split]:
            donor = max(range(len(SPLITS)), key=lambda k: len(members[k]))
            smallest = min(members[donor], key=lambda cluster: sizes[cluster])
            members[donor].remove(smallest)
            members[split].append(smallest)
            counts[donor] -= sizes[smallest]
            counts[split] += sizes[smallest]


def _cross_alignments(
    sides: list[list[str]], threshold: float, threads: int
) -> tuple[list[tuple[int, int, float]], float]:
    """Every pair of sides[0] x sides[1] (each normalised, distinct, longest first) whose bounds reach `threshold`,
    aligned in full: (position in sides[0], position in sides[1], identity); and the largest bound ruled out. A
    sequence on both sides is never paired with itself (nor aligned to an equal one)."""
    # one database, queries then references, each block longest first; the longer sequence of each pair is the query,
    # against the other block's shorter sequences sequences[first:end], of which sequences[cut:end] skip the LCS bound
    sequences = sides[0] + sides[1]
    count = len(sides[0])
    targets = _Targets.of(sequences)
    blocks = [(0, count), (count, len(sequences))]
    keys = [sorted(map(_order_key, side)) for side in sides]
    spans = []
    for side in (0, 1):
        other = 1 - side
        block_end = blocks[other][1]
        ascending = [length for length, _ in keys[other]]
        for i in range(*blocks[side]):
            first = block_end - bisect.bisect_left(keys[other], _order_key(sequences[i]))
            spans.append((i, first, block_end - _count_too_short(ascending, len(sequences[i])), block_end))
    with ThreadPool(threads) as pool:
        jobs = [(i, sequences[i], targets, first, cut) for i, first, cut, _ in spans if cut > first]
        similar_length, lcs_ruled_out = _screen(_lcs_bound, jobs, threshold, pool, threads)
        jobs = []
        for i, _, cut, end in spans:
            candidates = similar_length.get(i, []) + list(range(cut, end))
            if candidates:
                jobs.append((i, sequences[i], targets.subset(candidates), 0, len(candidates)))
        close, score_ruled_out = _screen(_score_bound, jobs, threshold, pool, threads)
        jobs = [(i, sequences[i], targets.subset(ids), 0, len(ids)) for i, ids in close.items()]
        measured = [
            (min(i, j), max(i, j) - count, identity) for i, j, identity in _run(_identities, jobs, pool, threads)
        ]
    return measured, max(lcs_ruled_out, score_ruled_out)


def max_cross_identity(
    queries: Sequence[str],
    references: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    threads: int | None = None,
) -> CrossIdentity:
    """The largest identity from any query (test protein) to any reference (training protein), over all pairs.

    Pairs a bound puts below `threshold` are not aligned; all others are, without the clustering's union-find
    shortcut. The bounds of the ruled-out pairs still count: see `CrossIdentity` for when the answer is exact. For an
    exact figure below 0.5, pass a lower threshold: on the demo corpus's split, 0.3 measures 0.455 where 0.5 only
    proves <= 0.499 (812 instead of 124 pairs aligned).
    """
    _check_threshold(threshold)
    threads = _thread_count(threads)
    sides = [
        sorted(set(_normalize_all(queries, "queries")), key=_order_key, reverse=True),
        sorted(set(_normalize_all(references, "references")), key=_order_key, reverse=True),
    ]
    pairs = len(sides[0]) * len(sides[1])
    if not set(sides[0]).isdisjoint(sides[1]):
        return CrossIdentity(1.0, True, pairs, 0)
    measured, best_bound = _cross_alignments(sides, threshold, threads)
    best_measured = max((identity for _, _, identity in measured), default=0.0)
    # also exact when nothing was aligned and every bound is zero (no pair shares a letter), or there are no pairs
    return CrossIdentity(max(best_measured, best_bound), best_measured >= best_bound, pairs, len(measured))


def linked_pairs(
    queries: Sequence[str],
    references: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    threads: int | None = None,
) -> list[tuple[int, int]]:
    """Every (query position, reference position) at identity >= `threshold`, identical sequences included, by the
    clustering's alignment and prefilters (exact, like `max_cross_identity`): the links that MMseqs2's k-mer
    prefilter cannot find for fragments (see dataset_card/mmseqs.py)."""
    _check_threshold(threshold)
    threads = _thread_count(threads)
    positions: list[dict[str, list[int]]] = [{}, {}]
    for side, (sequences, argument) in enumerate(((queries, "queries"), (references, "references"))):
        for position, sequence in enumerate(_normalize_all(sequences, argument)):
            positions[side].setdefault(sequence, []).append(position)
    # identical sequences are linked without alignment (`_cross_alignments` never pairs equal keys)
    linked = {(sequence, sequence) for sequence in positions[0].keys() & positions[1].keys()}
    sides = [sorted(positions[side], key=_order_key, reverse=True) for side in (0, 1)]
    measured, _ = _cross_alignments(sides, threshold, threads)
    linked.update((sides[0][i], sides[1][j]) for i, j, identity in measured if identity >= threshold)
    return sorted((q, r) for a, b in linked for q in positions[0][a] for r in positions[1][b])


def pair_identities(
    sequences: Sequence[str], pairs: Sequence[tuple[int, int]], threads: int | None = None
) -> list[float]:
    """Identity of each pair of positions in `sequences`, by the clustering's alignment (`sequence_identity`), each
    query aligned against all of its partners in one SIMD call: how candidate pairs from another engine's search
    (dataset_card/mmseqs.py) are judged by this module's definition."""
    threads = _thread_count(threads)
    normalized = _normalize_all(sequences, "sequences")
    targets = _Targets.of(normalized)
    partners: dict[int, list[int]] = {}
    for first, second in pairs:
        if normalized[first] != normalized[second]:
            query, target = sorted((first, second), key=lambda k: _order_key(normalized[k]), reverse=True)
            partners.setdefault(query, []).append(target)
    jobs = [(query, normalized[query], targets.subset(ids), 0, len(ids)) for query, ids in partners.items()]
    with ThreadPool(threads) as pool:
        found = {frozenset(pair): identity for *pair, identity in _run(_identities, jobs, pool, threads)}
    return [1.0 if normalized[a] == normalized[b] else found[frozenset((a, b))] for a, b in pairs]


@dataclass(frozen=True)
class Nearest:
    """The reference closest to one query: its position in the references (the first of equal sequences, and of
    equally identical ones) and their identity. When every pair's bound fell below the threshold, nothing was
    aligned: `reference` is None, `exact` is false and `identity` is the largest bound (the true value lies below it,
    and below the threshold)."""

    reference: int | None
    identity: float
    exact: bool


def nearest_identities(
    queries: Sequence[str],
    references: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    threads: int | None = None,
) -> list[Nearest]:
    """For each query (a test protein), the most identical reference (training protein), by the alignment and the
    prefilters of `max_cross_identity`, kept per query rather than over all pairs: what a leakage audit histograms
    and a nearest-neighbour baseline retrieves. Values at or above `threshold` are exact; a lower threshold measures
    more of them exactly at the cost of more alignments."""
    _check_threshold(threshold)
    threads = _thread_count(threads)
    normalized = _normalize_all(queries, "queries")
    normalized_references = _normalize_all(references, "references")
    first_of = {}
    for position, sequence in enumerate(normalized_references):
        first_of.setdefault(sequence, position)
    sides = [sorted(set(normalized), key=_order_key, reverse=True), sorted(first_of, key=_order_key, reverse=True)]
    sequences = sides[0] + sides[1]
    count = len(sides[0])
    targets = _Targets.of(sequences)
    keys = [sorted(map(_order_key, side)) for side in sides]
    spans = []  # as in max_cross_identity: each pair once, the longer sequence as query
    for side, (start, end) in enumerate(((0, count), (count, len(sequences)))):
        block_end = len(sequences) if side == 0 else count
        ascending = [length for length, _ in keys[1 - side]]
        for i in range(start, end):
            first = block_end - bisect.bisect_left(keys[1 - side], _order_key(sequences[i]))
            spans.append((i, first, block_end - _count_too_short(ascending, len(sequences[i])), block_end))
    bound = [0.0] * count  # per query: the largest bound of its ruled-out pairs
    # per query: (identity, -position in references) of the best aligned reference; ties go to the first reference,
    # whatever order the threads finish in
    best: list[tuple[float, int] | None] = [None] * count

    def screen(measure: _Measure, jobs: list[_Job], pool: ThreadPool) -> dict[int, list[int]]:
        survivors: dict[int, list[int]] = {}
        for i, j, value in _run(measure, jobs, pool, threads):
            if value >= threshold:
                survivors.setdefault(i, []).append(j)
            else:
                query = min(i, j)
                bound[query] = max(bound[query], value)
        return survivors

    with ThreadPool(threads) as pool:
        jobs = [(i, sequences[i], targets, first, cut) for i, first, cut, _ in spans if cut > first]
        similar_length = screen(_lcs_bound, jobs, pool)
        jobs = []
        for i, _, cut, end in spans:
            candidates = similar_length.get(i, []) + list(range(cut, end))
            if candidates:
                jobs.append((i, sequences[i], targets.subset(candidates), 0, len(candidates)))
        close = screen(_score_bound, jobs, pool)
        jobs = [(i, sequences[i], targets.subset(ids), 0, len(ids)) for i, ids in close.items()]
        for i, j, identity in _run(_identities, jobs, pool, threads):
            query, reference = min(i, j), max(i, j)
            candidate = (identity, -first_of[sequences[reference]])
            if best[query] is None or candidate > best[query]:
                best[query] = candidate
    found = {}
    for query, sequence in enumerate(sides[0]):
        identity, position = best[query] or (0.0, None)
        if sequence in first_of:  # the same sequence is a reference: identity 1 without alignment
            found[sequence] = Nearest(first_of[sequence], 1.0, True)
        elif position is not None and identity >= bound[query]:
            found[sequence] = Nearest(-position, identity, True)
        else:
            found[sequence] = Nearest(None, max(identity, bound[query]), False)
    return [found[sequence] for sequence in normalized]
