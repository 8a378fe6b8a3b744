"""`sepit-annotate` on a tiny saved model: a bundled FASTA file (with a record of bad letters), UniProtKB files and
structures give one row per (protein, question) in input order, the unreadable records reported and skipped; each
protein is encoded once (counted) and its answers are the `protein-qa` pipeline's; a folder of structures alone gives
every protein chain (a broken file skipped); two torchrun CPU processes write the table of one; a run killed with
SIGKILL resumes to the same table without answering anything twice; bad arguments exit 2 with one line."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from transformers import pipeline

from dataset_card.annotation import QUESTION_TYPES, annotate, main, question_set, read_proteins
from dataset_card.uniprot_reader import ReadReport
from tests.test_readme import BASH_COMMANDS

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
FASTA = FIXTURES / "fasta" / "proteins.fasta"
QUESTIONS = ["function", "go_mf"]
# Q6GZX1, Q6GZW2, Q6GZW4 and Q197E7 from the FASTA file, P00698 (with a structure) and P05067 from the UniProt files.
PROTEINS = ["P00698", "Q6GZX1", "Q6GZW2", "Q6GZW4", "Q197E7", "P05067"]
# Runs the command with every generate call slowed, so that a kill lands between two batches' writes.
SLOW_WRAPPER = """
import runpy, sys, time
from modeling_sepit import SepitForConditionalGeneration
generate = SepitForConditionalGeneration.generate
def slow(self, *args, **kwargs):
    time.sleep(0.5)
    return generate(self, *args, **kwargs)
SepitForConditionalGeneration.generate = slow
sys.argv = ["sepit-annotate", *sys.argv[1:]]
runpy.run_module("dataset_card.annotation", run_name="__main__")
"""


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    """Lysozyme (1AKI, declares P00698) and a file that is no structure."""
    folder = tmp_path_factory.mktemp("structures")
    shutil.copy(FIXTURES / "structures" / "biotite__1aki.pdb", folder)
    (folder / "broken.pdb").write_text("this is not a PDB file\n")
    return folder


def argv(saved_model: Path, structures: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(saved_model), "--fasta", str(FASTA), "--uniprot", str(FIXTURES / "uniprot"),
        "--structures", str(structures), "--output_dir", str(output), "--questions", *QUESTIONS,
        "--batch_size", "2", "--max_new_tokens", "4", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(saved_model, structures, tmp_path_factory) -> Path:
    """An uninterrupted run in this process."""
    output = tmp_path_factory.mktemp("one") / "annotation"
    assert main(argv(saved_model, structures, output)) == 0
    return output


def table(folder: Path) -> pd.DataFrame:
    parquet = pd.read_parquet(folder / "annotations.parquet")
    csv = pd.read_csv(folder / "annotations.csv", keep_default_na=False)
    assert csv["answer"].tolist() == parquet["answer"].tolist()
    return parquet


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_one_row_per_protein_and_question_the_bad_records_skipped(one_process) -> None:
    rows = table(one_process)
    assert rows["protein_id"].tolist() == [protein for protein in PROTEINS for _ in QUESTIONS]
    assert rows["question_type"].tolist() == QUESTIONS * len(PROTEINS)
    assert rows["question"].tolist() == [QUESTION_TYPES[name] for name in QUESTIONS] * len(PROTEINS)
    assert rows["sequence_length"].tolist()[::2] == [147, 60, 68, 70, 90, 770]
    assert rows["structure_used"].tolist()[::2] == [True] + [False] * 5
    assert rows.loc[0, "structure_source"] == "biotite__1aki.pdb:A"
    assert rows["answer"].map(lambda answer: isinstance(answer, str)).all() and rows["answer"].nunique() > 1
    skipped = [json.loads(line) for line in (one_process / "skipped.jsonl").read_text().splitlines()]
    reasons = {record["entry"]: record["reason"] for record in skipped}
    assert "invalid amino-acid letters ('1' at 10, 'J' at 23, 'J' at 24)" in reasons["BROKEN1"]
    assert reasons["P00698"].startswith("duplicate protein id (first read from")
    assert json.loads((one_process / ".sepit-output").read_text()) == {"writer": "annotate"}


def test_each_protein_is_encoded_once_and_answered_as_the_pipeline_answers(model_and_processor, structures) -> None:
    model, processor = model_and_processor
    proteins = read_proteins([str(FASTA)], structures=str(structures))
    questions = question_set(["function", "subcellular_location", "ec_number"])
    encoded = []
    features = model.get_protein_features

    def counting(**inputs):
        encoded.append(inputs["protein_input_ids"].shape[0])
        return features(**inputs)

    model.get_protein_features = counting
    try:
        rows = annotate(model, processor, proteins, questions, batch_size=2, max_new_tokens=4, progress=False)
    finally:
        del model.get_protein_features
    assert encoded == [2, 2, 1]  # five proteins, two per batch, each once for its three questions
    assert len(rows) == len(proteins) * len(questions) and proteins[0].coords is not None
    asker = pipeline("protein-qa", model=model, processor=processor)
    for row, (protein, question) in zip(rows, [(p, q) for p in proteins for q in questions.values()], strict=True):
        request = {"question": question, "sequence": protein.sequence}
        if protein.coords is not None:
            request.update(coords=protein.coords, coords_mask=protein.coords_mask)
        assert asker(request, max_new_tokens=4, do_sample=False)[0]["answer"] == row["answer"]


def test_a_folder_of_structures_alone_gives_every_protein_chain(tmp_path) -> None:
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    for name in ("biotite__1aki.pdb", "biopython__2BEG.cif", "graphein__AF-P04629-F1__P04629.pdb"):
        shutil.copy(FIXTURES / "structures" / name, folder / "sub" / name if "AF" in name else folder / name)
    (folder / "broken.cif").write_text("data_broken\n_atom_site.id 1\n")
    report = ReadReport()
    proteins = read_proteins(structures=str(folder), report=report)
    assert [protein.id for protein in proteins] == [
        *(f"biopython__2BEG.cif:{chain}" for chain in "ABCDE"),
        "biotite__1aki.pdb",
        "sub/graphein__AF-P04629-F1__P04629.pdb",
    ]
    assert all(protein.coords is not None and protein.coords_mask.all() for protein in proteins)
    assert len(proteins[-1].sequence) == 796 and proteins[0].structure_source == "biopython__2BEG.cif:A"
    assert [(Path(problem.file).name, problem.entry) for problem in report.problems] == [
        ("broken.cif", "structure file")
    ]


@pytest.mark.parametrize(
    "command",
    [command for _, command in BASH_COMMANDS if command.startswith("sepit-annotate") and "--server" not in command],
    ids=["fasta", "pdb"],
)  # the --server command runs in test_annotation_vllm.py, against a server
def test_the_readme_commands_run(command, saved_model, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the commands name the repository's fixtures
    tokens = [str(saved_model) if token == "outputs/main/hub-model" else token for token in shlex.split(command)[1:]]
    output = Path(tokens[tokens.index("--output_dir") + 1])
    tokens[tokens.index("--output_dir") + 1] = str(tmp_path / output.name)
    assert main(tokens) == 0
    rows = table(tmp_path / output.name)
    questions = tokens[tokens.index("--questions") + 1 : tokens.index("--output_dir")] if "--questions" in tokens else 6
    proteins = rows["protein_id"].unique().tolist()
    assert len(rows) == len(proteins) * (questions if isinstance(questions, int) else len(questions))
    if "--fasta" in tokens:  # the FASTA's five readable proteins, lysozyme with a structure of the folder
        assert proteins == PROTEINS[:5] and rows["structure_used"].tolist() == [True] * 6 + [False] * 24
    else:  # every protein chain of every file, each with its structure
        assert "biopython__2BEG.pdb:E" in proteins and "biotite__1aki.cif" in proteins
        assert rows["structure_used"].all() and rows["question_type"].tolist()[:2] == questions


def test_two_processes_give_the_table_of_one(one_process, saved_model, structures, tmp_path) -> None:
    output = tmp_path / "annotation"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "dataset_card.annotation", *argv(saved_model, structures, output),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    pd.testing.assert_frame_equal(table(output), table(one_process))
    shards = [(output / "shards" / f"rank-{rank:05d}.jsonl").read_text().splitlines() for rank in (0, 1)]
    assert sorted(len(lines) for lines in shards) == [4, 8]  # three batches of two proteins x two questions


def test_a_killed_run_resumes_to_the_same_table(one_process, saved_model, structures, tmp_path) -> None:
    output = tmp_path / "annotation"
    wrapper = tmp_path / "slow.py"
    wrapper.write_text(SLOW_WRAPPER)
    process = subprocess.Popen(
        [sys.executable, str(wrapper), *argv(saved_model, structures, output)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shard = output / "shards" / "rank-00000.jsonl"
    deadline = time.monotonic() + 240
    while not (shard.is_file() and shard.read_bytes().count(b"\n") >= 4):
        assert process.poll() is None and time.monotonic() < deadline, "no batch written before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = shard.read_bytes().count(b"\n")
    assert written < len(PROTEINS) * len(QUESTIONS) and not (output / "annotations.parquet").exists()
    assert main(argv(saved_model, structures, output)) == 0
    pd.testing.assert_frame_equal(table(output), table(one_process))
    indices = [json.loads(line)["index"] for line in shard.read_text().splitlines()]
    assert sorted(indices) == list(range(len(PROTEINS) * len(QUESTIONS)))  # nothing answered twice


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--questions", "colour"], "questions: unknown types ['colour']; choose from"),
        (["--batch_size", "0"], "batch_size must be at least 1"),
        (["--max_new_tokens", "0"], "max_new_tokens must be in [1,"),
        (["--structures", str(FASTA)], "is not a folder; give a folder of PDB/mmCIF/AlphaFold files"),
        (["--fasta", "missing.fasta"], "fasta: missing.fasta does not exist"),
        (["--device", "tpu"], "device"),
        (["--colour", "red"], "--colour"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(saved_model, structures, tmp_path, capsys, extra, message) -> None:
    assert main(argv(saved_model, structures, tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("annotate: error: ") and message in error


def test_a_questions_file_gives_its_own_questions(model_and_processor, tmp_path) -> None:
    asked = {"binding": "Which ligands does <protein> bind?", "fold": "<protein> What fold does it have?"}
    (tmp_path / "questions.json").write_text(json.dumps(asked))
    questions = question_set(["function"], str(tmp_path / "questions.json"))
    assert questions == asked  # the file replaces --questions
    proteins = read_proteins([str(FASTA)])[:1]
    rows = annotate(*model_and_processor, proteins, questions, max_new_tokens=2, progress=False)
    assert [(row["question_type"], row["question"]) for row in rows] == list(asked.items())


def test_bad_questions_files_and_unreadable_inputs_exit_2(saved_model, tmp_path, capsys) -> None:
    untagged = tmp_path / "questions.json"
    untagged.write_text(json.dumps({"role": "What does it do?"}))
    only_bad = tmp_path / "bad.fasta"
    only_bad.write_text(">X1\nMK1V\n")
    base = ["--model_name_or_path", str(saved_model), "--output_dir", str(tmp_path / "out")]
    assert main([*base, "--fasta", str(FASTA), "--questions_file", str(untagged)]) == 2
    error = capsys.readouterr().err
    assert "question 'role' of" in error and "must be a string with one <protein> tag" in error
    assert main([*base, "--fasta", str(only_bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"annotate: skipped {only_bad} (X1): sequence: invalid amino-acid letters")
    assert lines[-1] == "annotate: error: no readable protein in the inputs (1 problems reported)"


def test_a_rerun_with_other_settings_is_refused(one_process, saved_model, structures, capsys) -> None:
    assert main(argv(saved_model, structures, one_process, "--max_new_tokens", "5")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "other settings (max_new_tokens 4 -> 5)" in error and "--overwrite starts over" in error
