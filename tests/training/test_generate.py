"""`training/generate.py` on a tiny saved model and the demo data: two CPU processes (torchrun, gloo) give the one
process's answers in input order, a run killed with SIGKILL mid-way resumes to the uninterrupted run's files, both
formats are written, and bad arguments exit 2 with a one-line message."""

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_dataset

from modeling_sepit.evaluation_sepit import PURE_LLM, SEPIT

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "training" / "generate.py"
generate = runpy.run_path(str(GENERATE))
ROWS = 12
STREAMING = ["--streaming", "--stream_window", "5"]  # windows of 5, 5 and 2 rows
# Runs the command with every generate call slowed, so that a kill lands between two batches' writes.
SLOW_WRAPPER = """
import runpy, sys, time
from modeling_sepit import SepitForConditionalGeneration
generate = SepitForConditionalGeneration.generate
def slow(self, *args, **kwargs):
    time.sleep(0.5)
    return generate(self, *args, **kwargs)
SepitForConditionalGeneration.generate = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def argv(saved_model: Path, demo_dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(saved_model), "--dataset_name", str(demo_dataset), "--output_dir", str(output),
        "--max_samples", str(ROWS), "--batch_size", "2", "--max_new_tokens", "6", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(saved_model, demo_dataset, tmp_path_factory) -> Path:
    """An uninterrupted run in this process."""
    output = tmp_path_factory.mktemp("one") / "generation"
    assert generate["main"](argv(saved_model, demo_dataset, output)) == 0
    return output


def outputs(folder: Path) -> tuple[str, str]:
    return (folder / "predictions.jsonl").read_text(), (folder / "test_output.jsonl").read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_both_formats_in_input_order(one_process, demo_dataset) -> None:
    rows = load_dataset(str(demo_dataset), "instructions", split="test").select(range(ROWS))
    predictions, original = ([json.loads(line) for line in text.splitlines()] for text in outputs(one_process))
    assert [(p["accession"], p["question"], p["reference"]) for p in predictions] == [
        (row["accession"], row["question"], row["answer"]) for row in rows
    ]
    assert [record["response"] for record in original] == [record[SEPIT] for record in predictions]
    assert [record["conversation"][0]["content"] for record in original] == rows["question"]
    assert json.loads((one_process / ".sepit-output").read_text()) == {"writer": "generate"}


def test_a_streamed_split_gives_the_answers_in_memory(one_process, saved_model, demo_dataset, tmp_path) -> None:
    output = tmp_path / "generation"
    assert generate["main"](argv(saved_model, demo_dataset, output, *STREAMING)) == 0
    assert outputs(output) == outputs(one_process)
    settings = json.loads((output / "shards" / "settings.json").read_text())
    assert settings["streaming"] is True and settings["window"] == 5 and settings["max_samples"] == ROWS


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_two_processes_give_the_answers_of_one(one_process, saved_model, demo_dataset, tmp_path, streaming) -> None:
    output = tmp_path / "generation"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(GENERATE),
        *argv(saved_model, demo_dataset, output, *(STREAMING if streaming else [])),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert outputs(output) == outputs(one_process)
    shards = [(output / "shards" / f"rank-{rank:05d}.jsonl").read_text().splitlines() for rank in (0, 1)]
    # In memory: three batches of two each. Streamed: windows of 5, 5 and 2 rows, the first and last to rank 0.
    assert [len(lines) for lines in shards] == ([7, 5] if streaming else [ROWS // 2, ROWS // 2])


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_a_killed_run_resumes_to_the_uninterrupted_answers(
    one_process, saved_model, demo_dataset, tmp_path, streaming
) -> None:
    output = tmp_path / "generation"
    wrapper = tmp_path / "slow.py"
    wrapper.write_text(SLOW_WRAPPER)
    extra = STREAMING if streaming else []
    process = subprocess.Popen(
        [sys.executable, str(wrapper), str(GENERATE), *argv(saved_model, demo_dataset, output, *extra)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shard = output / "shards" / "rank-00000.jsonl"
    deadline = time.monotonic() + 240
    while not (shard.is_file() and shard.read_bytes().count(b"\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "no batch written before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = shard.read_bytes().count(b"\n")
    assert written < ROWS and not (output / "predictions.jsonl").exists()
    assert generate["main"](argv(saved_model, demo_dataset, output, *extra)) == 0
    assert outputs(output) == outputs(one_process)
    assert shard.read_bytes().count(b"\n") == ROWS  # the answers written before the kill were not generated again


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--system", "gpt"], "system: 'gpt'; choose from"),
        (["--max_samples", "0"], "max_samples must be at least 1"),
        (["--max_new_tokens", "0"], "max_new_tokens must be in [1,"),
        (["--split", "a/b"], "split: 'a/b' is not a split name"),
        (["--system", PURE_LLM], "is not a PureLLM folder"),
        (["--dataset_config", "captions"], "dataset_config: captions rows of"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(saved_model, demo_dataset, tmp_path, capsys, extra, message) -> None:
    assert generate["main"](argv(saved_model, demo_dataset, tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("generate: error: ") and message in error


def test_a_rerun_with_other_settings_or_over_a_model_is_refused(one_process, saved_model, demo_dataset, capsys) -> None:
    assert generate["main"](argv(saved_model, demo_dataset, one_process, "--max_new_tokens", "7")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "other settings (max_new_tokens 6 -> 7)" in error and "--overwrite starts over" in error
    assert generate["main"](argv(saved_model, demo_dataset, saved_model.parent)) == 2
    assert "is or holds the input" in capsys.readouterr().err
