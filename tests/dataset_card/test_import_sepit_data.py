"""The SEPIT-Data importer on a folder in the release's layout (tests/fixtures/sepit-data): every row imported or
reported, coordinates exactly `node_position`, the long chain and the unknown id, the multi-turn conversation, bad rows
of every kind, the card and its leakage audit, loading and training on the output, the output-path rule and the CLI."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard

from dataset_card.build_dataset import FEATURES
from dataset_card.homology import Nearest, nearest_identities, sequence_identity
from dataset_card.import_sepit_data import ImportArguments, ImportReport, import_sepit_data, main
from modeling_sepit.atomic_folder import MARKER
from tests.conftest import FIXTURES
from tests.training.test_sft import sft, stage1_argv

RELEASE = FIXTURES / "sepit-data" / "database"
SPLITS = {"train", "validation", "qa_test", "yn_test"}


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def release_rows() -> dict[str, list[dict]]:
    """Every row of every release file, by the name the report gives the file (stage2/qa_test.jsonl)."""
    return {f"{path.parent.name}/{path.name}": jsonl_lines(path) for path in sorted(RELEASE.glob("stage*/*.jsonl"))}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sepit-data") / "imported"
    return import_sepit_data(ImportArguments(input_dir=str(RELEASE), output_dir=str(folder), licence="cc-by-4.0"))


@pytest.fixture(scope="module")
def instructions(imported):
    return load_dataset(str(imported.output_dir), "instructions")


def test_every_row_is_imported_or_reported(imported) -> None:
    report = imported.report
    for file, rows in release_rows().items():
        assert report.imported[file] + report.skipped[file] == len(rows), file
    (problem,) = report.problems
    assert (problem.file, problem.entry) == ("stage2/qa_test.jsonl", "line 91, id MISSING1")
    assert problem.reason.startswith("unknown id: 'MISSING1' is in neither pdb.h5 nor sequences.csv")


def test_splits_follow_the_file_names_and_load_with_the_builders_features(imported, instructions) -> None:
    assert set(instructions) == SPLITS
    for split in instructions.values():
        assert split.features == FEATURES["instructions"]
    rows = release_rows()
    assert instructions["validation"].num_rows == len(rows["stage2/valid.jsonl"])
    assert instructions["qa_test"].num_rows == len(rows["stage2/qa_test.jsonl"]) - 1  # MISSING1
    assert set(instructions["yn_test"]["type"]) == {"yes_no:unlabelled"}
    assert set(instructions["qa_test"]["type"]) == {"open_ended"}
    assert set(instructions["yn_test"]["source_field"]) == {"stage2/yn_test.jsonl"}
    captions = load_dataset(str(imported.output_dir), "captions", split="train")
    assert captions.features == FEATURES["captions"]
    stage1 = rows["stage1/train.jsonl"]
    assert captions["messages"] == [row["conversation"] for row in stage1]
    # every stage-0 caption is the one its stage-1 row teaches, so none is written twice
    assert sorted(zip(captions["accession"], captions["caption"], strict=True)) == sorted(
        (row["id"], row["caption"]) for row in rows["stage0/train.jsonl"]
    )
    default = load_dataset(str(imported.output_dir), split="train")  # instructions is the default config
    assert default.num_rows == instructions["train"].num_rows


def test_rows_keep_the_release_order_and_conversations(instructions) -> None:
    for split, file in (("train", "train"), ("yn_test", "yn_test")):
        expected = jsonl_lines(RELEASE / "stage2" / f"{file}.jsonl")
        assert instructions[split]["accession"] == [row["id"] for row in expected]
        assert instructions[split]["messages"] == [row["conversation"] for row in expected]


def test_the_multi_turn_conversation_survives(imported, instructions) -> None:
    last = jsonl_lines(RELEASE / "stage2" / "train.jsonl")[-1]
    assert len(last["conversation"]) == 4
    row = instructions["train"][-1]
    assert row["messages"] == last["conversation"]
    assert (row["question"], row["answer"]) == (last["conversation"][0]["content"], last["conversation"][1]["content"])
    assert imported.statistics.multi_turn == 1


def test_coordinates_are_exactly_node_position_and_others_sequence_only(instructions) -> None:
    rows = {row["accession"]: row for split in instructions.values() for row in split}
    with h5py.File(RELEASE / "pdb.h5") as h5:
        structures = {key: (h5[key]["sequence"][()][0].decode(), h5[key]["node_position"][()]) for key in h5}
    assert set(structures) == {"LONG1100", "P04629", "P68871", "P69905"}
    for key, (sequence, node_position) in structures.items():
        row = rows[key]
        assert row["sequence"] == sequence and row["structure_source"] == f"pdb.h5:{key}"
        np.testing.assert_array_equal(np.array(row["coords"], dtype=np.float32), node_position)
        assert row["coords_mask"] == [True] * len(sequence)
    csv_lines = (RELEASE / "sequences.csv").read_text().splitlines()[1:]
    listed = dict(line.split(",") for line in csv_lines)
    assert {"P68871", "P69905"} <= set(listed)  # in both files: pdb.h5's row is the one used (compared above)
    for accession, row in rows.items():
        if accession not in structures:
            assert row["sequence"] == listed[accession]
            assert row["coords"] is None and row["coords_mask"] is None and row["structure_source"] is None


def test_the_long_chain_is_kept_whole_and_the_card_says_the_processor_cuts_it(imported, instructions) -> None:
    (long,) = [row for row in instructions["train"] if row["accession"] == "LONG1100"][:1]
    assert len(long["sequence"]) == len(long["coords"]) == 1100
    assert "LONG1100" in imported.statistics.long_chains
    card = (imported.output_dir / "README.md").read_text()
    assert "longer than 1,022 residues. They are kept whole" in card and "truncates them" in card


def test_card_states_source_licence_counts_and_the_leakage_audit(imported, instructions) -> None:
    card = DatasetCard.load(imported.output_dir / "README.md")
    assert card.data.license == "cc-by-4.0"
    assert {config["config_name"] for config in card.data.configs} == {"captions", "instructions"}
    assert "U-rara/SEPIT-Data" in card.text and "| unknown id | 1 |" in card.text
    assert f"| yn_test | 11 | 1 | 0 | {instructions['yn_test'].num_rows} |" in card.text
    audit = imported.audit
    test_proteins = set(instructions["qa_test"]["accession"]) | set(instructions["yn_test"]["accession"])
    assert {row.protein for row in audit} == test_proteins
    captions = load_dataset(str(imported.output_dir), "captions", split="train")
    train = {row["accession"]: row["sequence"] for rows in (instructions["train"], captions) for row in rows}
    sequences = {row["accession"]: row["sequence"] for split in ("qa_test", "yn_test") for row in instructions[split]}
    for row in audit:  # the project's pairwise identity, exhaustively
        best = max(sequence_identity(sequences[row.protein], sequence) for sequence in train.values())
        if row.exact:
            assert row.identity == pytest.approx(best) and sequence_identity(
                sequences[row.protein], train[row.nearest]
            ) == pytest.approx(best)
        else:
            assert best < 0.3 and row.nearest is None
    above_half = sum(row.exact and row.identity >= 0.5 for row in audit) / len(audit)
    assert f"| all | {len(audit)} | " in card.text and f"| {above_half:.1%} | 0.0% |" in card.text
    assert "| 40%-50% | 2 |" in card.text  # P13080 and P68871 (haemoglobin beta against alpha)
    tsv = (imported.output_dir / "leakage_audit.tsv").read_text().splitlines()
    assert len(tsv) == 1 + len(audit) and tsv[0].startswith("protein\ttest_splits\tnearest_training_protein")


def test_nearest_identities_are_the_pairwise_maxima() -> None:
    lines = (RELEASE / "sequences.csv").read_text().splitlines()[1:]
    sequences = [line.split(",")[1] for line in lines]
    queries, references = sequences[:8] + [sequences[20]], sequences[8:30]
    for threshold in (0.3, 0.5):
        for query, nearest in zip(queries, nearest_identities(queries, references, threshold, threads=1), strict=True):
            identities = [sequence_identity(query, reference) for reference in references]
            if nearest.exact:
                assert nearest.identity == pytest.approx(max(identities))
                assert identities[nearest.reference] == pytest.approx(max(identities))
            else:
                assert max(identities) <= nearest.identity < threshold and nearest.reference is None
    assert nearest_identities([sequences[20]], references)[0] == Nearest(12, 1.0, True)  # the same sequence


def _release_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "database"
    shutil.copytree(RELEASE, folder)
    for path in folder.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return folder


def test_bad_rows_are_reported_with_their_reason_and_skipped(tmp_path) -> None:
    folder = _release_copy(tmp_path)
    with h5py.File(folder / "pdb.h5", "a") as h5:
        short = h5.create_group("SHORT")
        short["sequence"] = np.array([b"MKV"])
        short["node_position"] = np.zeros((2, 3), dtype=np.float32)
        broken = h5.create_group("NAN")
        broken["sequence"] = np.array([b"MKV"])
        broken["node_position"] = np.array([[0, 0, 0], [np.nan, 0, 0], [1, 1, 1]], dtype=np.float32)

    def ask(protein: str, question: str = "What is <protein> ?") -> str:
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": "An enzyme."}]
        return json.dumps({"id": protein, "conversation": turns})

    bad = {
        ask("SHORT"): "length mismatch",
        ask("NAN"): "non-finite coordinates",
        json.dumps({"id": "P69905", "conversation": []}): "empty conversation",
        ask("P69905", "What is this protein ?"): "<protein> count mismatch",
        ask("P69905", "Compare <protein> with <protein> ."): "<protein> count mismatch",
        "{not json": "not JSON",
        json.dumps({"conversation": []}): "no id",
        ask("UNKNOWN"): "unknown id",
    }
    with (folder / "stage2" / "train.jsonl").open("a") as handle:
        handle.write("\n".join([*bad, ask("P69905")]) + "\n")
    seen = []
    result = import_sepit_data(
        ImportArguments(input_dir=str(folder), output_dir=str(tmp_path / "out"), leakage_audit=False),
        ImportReport(on_skip=seen.append),
    )
    train_problems = [problem for problem in seen if problem.file == "stage2/train.jsonl"]
    assert [problem.reason.split(":")[0] for problem in train_problems] == list(bad.values())
    assert result.report.imported["stage2/train.jsonl"] == 576  # the fixture's 575 and the good row after the bad
    assert load_dataset(str(tmp_path / "out"), "instructions", split="train")[-1]["accession"] == "P69905"
    assert "Not run for this import" in (tmp_path / "out" / "README.md").read_text()


def test_sft_trains_on_the_imported_instructions(imported, tiny_parts, tmp_path) -> None:
    parts = {"dataset": imported.output_dir, "parts": tiny_parts}
    argv = stage1_argv(
        parts, tmp_path / "stage2", "--dataset_config", "instructions", "--max_steps", "2", "--save_steps", "2"
    )
    assert sft["main"](argv) == 0
    assert (tmp_path / "stage2" / "checkpoint-2" / "trainer_state.json").is_file()


def test_output_path_rule(imported, tmp_path, capsys) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    argv = ["--input_dir", str(RELEASE), "--output_dir", str(stranger), "--leakage_audit", "false"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("import_sepit_data: error: output_dir:") and "--overwrite" in error
    assert len(error.splitlines()) == 1 and (stranger / "notes.txt").read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    assert (stranger / MARKER).is_file() and not (stranger / "notes.txt").exists()
    assert main(argv) == 0  # its own earlier import is replaced without --overwrite
    inside = ["--input_dir", str(RELEASE), "--output_dir", str(RELEASE / "out")]
    assert main(inside) == 2
    assert "lies inside the input" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: ["--input_dir", str(tmp / "missing")], "input_dir: "),
        (lambda tmp: ["--input_dir", str(tmp)], "has no stage2/*.jsonl"),
        (lambda tmp: ["--input_dir", str(RELEASE), "--licence", "CC BY 4.0"], "licence: "),
        (lambda tmp: ["--input_dir", str(RELEASE), "--push_to_hub", "not a repo"], "push_to_hub: "),
    ],
)
def test_bad_cli_input_exits_2_with_one_line(make, message, tmp_path, capsys) -> None:
    assert main([*make(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert not (tmp_path / "out").exists()
