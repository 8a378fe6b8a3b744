"""Homology-controlled splits on real proteins of the demo corpus in dataset_card/data/uniprot (see its SOURCES.md).

The reference for every identity is Biopython's PairwiseAligner (same scores, end gaps free) or, for the clustering,
aligning every pair one by one: the prefilters must never change an answer.
"""

from itertools import combinations
from pathlib import Path

import pytest
from Bio.Align import PairwiseAligner, substitution_matrices

from dataset_card.homology import (
    CrossIdentity,
    cluster_by_identity,
    identity_bounds,
    linked_pairs,
    max_cross_identity,
    pair_identities,
    read_cluster_tsv,
    sequence_identity,
    split_clusters,
)
from dataset_card.uniprot_reader import iter_entries

DATA = Path(__file__).resolve().parents[2] / "dataset_card" / "data" / "uniprot"
# Proteins up to this length keep the suite fast; the 3-38k residue giants are left to the benchmark.
MAX_LENGTH = 1000


@pytest.fixture(scope="module")
def store() -> list[tuple[str, str]]:
    """(accession, sequence) of the flat-file store folder: FGFR2 (P21802) with its isoform entries, FGFR1
    (P11362), Q9EPI6 and its isoforms, a 14-3-3 pair and unrelated viral proteins."""
    return [
        (e.accession, e.sequence) for e in iter_entries(DATA / "uniprot_flat_store") if len(e.sequence) <= MAX_LENGTH
    ]


@pytest.fixture(scope="module")
def corpus(store) -> list[tuple[str, str]]:
    """The store plus the core folder, duplicates kept (Q15758 is there three times)."""
    core = [
        (e.accession, e.sequence) for e in iter_entries(DATA / "uniprot_flat_core") if len(e.sequence) <= MAX_LENGTH
    ]
    return core + store


@pytest.fixture(scope="module")
def by_accession(corpus) -> dict[str, str]:
    return dict(corpus)


@pytest.fixture(scope="module")
def exhaustive(store) -> dict[tuple[int, int], float]:
    """Identity of every pair of the store, aligned one pair at a time (no prefilter)."""
    return {(a, b): sequence_identity(store[a][1], store[b][1]) for a, b in combinations(range(len(store)), 2)}


def single_linkage(size: int, linked: list[tuple[int, int]]) -> list[set[int]]:
    """Connected components, the slow obvious way: the reference partition for the union-find clustering."""
    components = [{k} for k in range(size)]
    for a, b in linked:
        first = next(c for c in components if a in c)
        second = next(c for c in components if b in c)
        if first is not second:
            first |= second
            components.remove(second)
    return components


def partition(cluster_ids: list[int]) -> list[set[int]]:
    groups: dict[int, set[int]] = {}
    for index, cluster in enumerate(cluster_ids):
        groups.setdefault(cluster, set()).add(index)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------------
# identity and its bounds

# (pair, identity): homologues and isoforms whose alignment is unambiguous, then weak or unrelated pairs
RELATED = [("P11362", "P21802"), ("P21802", "P21802-2"), ("Q9EPI6", "Q9EPI6-2"), ("A4K2U9", "Q9CQV8")]
RELATED += [("A4K2U9", "P48347"), ("Q9G0S9", "Q9T4R0"), ("Q9G0S9", "A0PHU1")]
WEAK = [("Q6GZV7", "A0A021WW32"), ("Q6GZW4", "Q8VS35"), ("P11362", "Q6GZX4"), ("O60260", "P03378")]


def biopython_identity(first: str, second: str) -> float:
    """Identities of Biopython's optimal alignment (BLOSUM62, gap 10 + 1 per extra residue, end gaps free)."""
    aligner = PairwiseAligner(mode="global", substitution_matrix=substitution_matrices.load("BLOSUM62"))
    aligner.open_gap_score, aligner.extend_gap_score, aligner.end_gap_score = -10, -1, 0
    return aligner.align(first, second)[0].counts().identities / min(len(first), len(second))


def biopython_lcs(first: str, second: str) -> float:
    """Longest common subsequence / shorter length, as Biopython's match-1 mismatch-0 gap-0 global score."""
    aligner = PairwiseAligner(mode="global", match_score=1, mismatch_score=0, gap_score=0)
    return aligner.score(first, second) / min(len(first), len(second))


@pytest.mark.parametrize("pair", RELATED)
def test_identity_of_homologues_matches_biopython(by_accession, pair) -> None:
    first, second = (by_accession[accession] for accession in pair)
    assert sequence_identity(first, second) == pytest.approx(biopython_identity(first, second), abs=0.005)
    assert sequence_identity(first, second) == sequence_identity(second, first)


@pytest.mark.parametrize("pair", RELATED + WEAK)
def test_bounds_hold_for_pyopal_and_biopython_alignments(by_accession, pair) -> None:
    first, second = (by_accession[accession] for accession in pair)
    lcs, score_gap = identity_bounds(first, second)
    assert lcs == pytest.approx(biopython_lcs(first, second), abs=1e-12)
    for identity in (sequence_identity(first, second), biopython_identity(first, second)):
        assert lcs >= identity
        assert score_gap >= identity


def test_bounds_hold_on_every_pair_of_the_store(store, exhaustive) -> None:
    for (a, b), identity in exhaustive.items():
        assert min(identity_bounds(store[a][1], store[b][1])) >= identity, (store[a][0], store[b][0])


def test_rare_residues_are_mapped_not_rejected(by_accession) -> None:
    # A0A6A5BR32 is an 11-residue fragment with a pyrrolysine (O); O -> K, U -> C, unknown letters -> X
    fragment = by_accession["A0A6A5BR32"]
    assert "O" in fragment
    assert sequence_identity(fragment, fragment.replace("O", "K")) == 1.0
    assert sequence_identity("MKUV", "mkcv") == 1.0


# ----------------------------------------------------------------------------------------------------------------
# clusters


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_clusters_equal_exhaustive_single_linkage(store, exhaustive, threshold: float) -> None:
    linked = [pair for pair, identity in exhaustive.items() if identity >= threshold]
    expected = single_linkage(len(store), linked)
    got = partition(cluster_by_identity([sequence for _, sequence in store], threshold=threshold, threads=2))
    assert sorted(map(sorted, got)) == sorted(map(sorted, expected))
    assert len(expected) < len(store)


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_linked_pairs_are_the_exhaustive_pairs_at_the_threshold(store, exhaustive, threshold: float) -> None:
    """What the MMseqs2 engine asks pyopal for fragments: every query-reference pair at or above the threshold;
    a sequence on both sides (here the first reference, repeated among the queries) links to itself too."""
    sequences = [sequence for _, sequence in store]
    queries, references = list(range(0, len(store), 3)), [k for k in range(len(store)) if k % 3]
    queries.append(references[0])
    expected = {
        (q, r)
        for q, first in enumerate(queries)
        for r, second in enumerate(references)
        if first == second or exhaustive[min(first, second), max(first, second)] >= threshold
    }
    got = linked_pairs([sequences[k] for k in queries], [sequences[k] for k in references], threshold, threads=2)
    assert set(got) == expected and len(got) == len(expected) and expected - {(len(queries) - 1, 0)}


def test_pair_identities_are_those_of_single_alignments(store, exhaustive) -> None:
    sequences = [sequence for _, sequence in store]
    pairs = [pair for k, pair in enumerate(exhaustive) if k % 7 == 0]
    pairs += [(b, a) for a, b in pairs[:5]] + [(0, 0)]
    expected = [exhaustive[min(a, b), max(a, b)] if a != b else 1.0 for a, b in pairs]
    assert pair_identities(sequences, pairs, threads=2) == pytest.approx(expected, abs=1e-12)


def test_isoforms_homologues_and_duplicates_share_a_cluster(corpus) -> None:
    accessions = [accession for accession, _ in corpus]
    clusters = cluster_by_identity([sequence for _, sequence in corpus], threads=2)
    assert accessions.count("Q15758") == 3
    for family in (["P21802", "P21802-1", "P21802-2", "P11362"], ["Q9EPI6", "Q9EPI6-1", "Q9EPI6-2"], ["Q15758"]):
        assert len({c for a, c in zip(accessions, clusters, strict=True) if a in family}) == 1, family
    assert clusters[accessions.index("P21802")] != clusters[accessions.index("Q9EPI6")]
    first_seen = [c for k, c in enumerate(clusters) if c not in clusters[:k]]
    assert first_seen == list(range(len(first_seen)))


# ----------------------------------------------------------------------------------------------------------------
# splits


def test_split_keeps_test_and_validation_below_half_identity_to_train(corpus) -> None:
    sequences = [sequence for _, sequence in corpus]
    clusters = cluster_by_identity(sequences, threads=2)
    splits = split_clusters(clusters, seed=0)
    assert all(len({s for s, c in zip(splits, clusters, strict=True) if c == cluster}) == 1 for cluster in clusters)
    train = [s for s, split in zip(sequences, splits, strict=True) if split == "train"]
    for held_out in ("test", "validation"):
        queries = [s for s, split in zip(sequences, splits, strict=True) if split == held_out]
        cross = max_cross_identity(queries, train, threads=2)
        assert cross.max_identity < 0.5
        assert cross.pairs == len(set(queries)) * len(set(train))
        assert 0 <= cross.aligned_pairs <= cross.pairs


def test_cross_identity_is_exact_or_an_upper_bound(store, exhaustive) -> None:
    sequences = [sequence for _, sequence in store]
    splits = split_clusters(cluster_by_identity(sequences, threads=2), fractions=(0.7, 0.0, 0.3), seed=1)
    test = [k for k, split in enumerate(splits) if split == "test"]
    train = [k for k, split in enumerate(splits) if split == "train"]
    truth = max(exhaustive[min(a, b), max(a, b)] for a in test for b in train)
    for threshold in (0.5, 0.2):
        cross = max_cross_identity([sequences[k] for k in test], [sequences[k] for k in train], threshold, threads=2)
        if cross.exact:
            assert cross.max_identity == pytest.approx(truth, abs=1e-12)
        else:
            assert truth <= cross.max_identity < threshold
    assert max_cross_identity([sequences[0]], sequences[:3]) == CrossIdentity(1.0, True, 3, 0)


def test_split_is_reproducible_and_close_to_the_fractions(corpus) -> None:
    clusters = cluster_by_identity([sequence for _, sequence in corpus], threads=2)
    first = split_clusters(clusters, seed=7)
    assert first == split_clusters(clusters, seed=7)
    assert first != split_clusters(clusters, seed=8)
    largest = max(clusters.count(c) for c in set(clusters))
    for split, share in zip(("train", "validation", "test"), (0.8, 0.1, 0.1), strict=True):
        assert abs(first.count(split) - share * len(clusters)) <= largest


def test_few_clusters_still_give_validation_and_test() -> None:
    assert sorted(split_clusters([0, 0, 0, 1, 2])) == ["test", "train", "train", "train", "validation"]
    assert split_clusters([5, 5]) == ["train", "train"]
    assert split_clusters([]) == []


# Synthetic clusters 0-29 of 1 to 6 proteins (cluster c has 1 + c % 6); a structure in one protein of each of
# clusters 5, 11 and 17 (three of the largest, which an unstratified split sends to train first) and of cluster 0.
SYNTHETIC = [cluster for cluster in range(30) for _ in range(1 + cluster % 6)]
STRUCTURED = {0, 5, 11, 17}


def structure_flags(cluster_ids: list[int], structured: set[int]) -> list[bool]:
    """One protein with a structure (the first member) per cluster in `structured`."""
    return [c in structured and cluster_ids.index(c) == k for k, c in enumerate(cluster_ids)]


def structured_splits(splits: list[str], flags: list[bool]) -> set[str]:
    return {split for split, flag in zip(splits, flags, strict=True) if flag}


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.7, 0.0, 0.3)])
def test_clusters_with_a_structure_reach_every_split_first(fractions) -> None:
    flags = structure_flags(SYNTHETIC, STRUCTURED)
    wanted = {split for split, share in zip(("train", "validation", "test"), fractions, strict=True) if share}
    for seed in range(4):
        splits = split_clusters(SYNTHETIC, fractions, seed, flags)
        assert splits == split_clusters(SYNTHETIC, fractions, seed, flags)
        assert structured_splits(splits, flags) == wanted
        assert len(set(zip(SYNTHETIC, splits, strict=True))) == 30  # whole clusters: one split each
        for split, share in zip(("train", "validation", "test"), fractions, strict=True):
            assert abs(splits.count(split) - share * len(SYNTHETIC)) <= 6  # the largest cluster
    assert len({tuple(split_clusters(SYNTHETIC, fractions, seed, flags)) for seed in range(4)}) > 1


def test_stratification_needs_three_clusters_with_a_structure() -> None:
    no_structure = [False] * len(SYNTHETIC)
    for seed in range(3):
        plain = split_clusters(SYNTHETIC, seed=seed)
        assert structured_splits(plain, structure_flags(SYNTHETIC, {5, 11, 17})) == {"train"}  # what it fixes
        assert split_clusters(SYNTHETIC, seed=seed, with_structure=no_structure) == plain
        flags = structure_flags(SYNTHETIC, {5, 11})  # two: placed first, by share, none taken from train
        assert structured_splits(split_clusters(SYNTHETIC, seed=seed, with_structure=flags), flags) == {"train"}
    three = [True, True, False, True, False]  # five singletons, three with a structure: one per split
    splits = split_clusters([0, 1, 2, 3, 4], seed=0, with_structure=three)
    assert structured_splits(splits, three) == {"train", "validation", "test"} and splits.count("train") == 3
    with pytest.raises(ValueError, match="with_structure must have one flag per protein: 2 flags for 3"):
        split_clusters([0, 1, 2], with_structure=[True, False])


# ----------------------------------------------------------------------------------------------------------------
# MMseqs2 clusters and bad input


def test_read_cluster_tsv_maps_members_and_keeps_unlisted_accessions_alone(tmp_path: Path) -> None:
    path = tmp_path / "clusters_cluster.tsv"
    path.write_text("P21802\tP21802\nP21802\tP21802-2\nP21802\tP11362\nQ9EPI6\tQ9EPI6\nQ9EPI6\tQ9EPI6-2\n")
    accessions = ["Q9EPI6-2", "P11362", "Q15758", "P21802", "Q9EPI6"]
    assert read_cluster_tsv(path, accessions) == [0, 1, 2, 1, 0]


@pytest.mark.parametrize(
    "text, line", [("P21802\tP21802\nP21802 P11362\n", 2), ("P21802\tP21802\tP11362\n", 1), ("A\tB\nC\tB\n", 2)]
)
def test_read_cluster_tsv_rejects_malformed_lines(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"broken\.tsv, line {line}: expected 'representative<TAB>member'"):
        read_cluster_tsv(path, ["P21802"])


def test_bad_arguments_name_what_is_valid(by_accession) -> None:
    protein = by_accession["P21802"]
    with pytest.raises(ValueError, match=r"sequences\[1\] is empty"):
        cluster_by_identity([protein, ""])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        max_cross_identity([protein], [""])
    for threshold in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"threshold must be .* in \(0, 1\]"):
            cluster_by_identity([protein], threshold=threshold)
    with pytest.raises(ValueError, match="threads must be a positive"):
        cluster_by_identity([protein], threads=0)
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        split_clusters([0, 1], fractions=(0.5, 0.3, 0.3))
    with pytest.raises(ValueError, match="fractions must be three shares"):
        split_clusters([0, 1], fractions=(0.9, 0.1))
