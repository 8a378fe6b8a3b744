"""Streamed training data (`load_training_splits(streaming=True)`, the scripts' `--streaming`): the stream holds the
in-memory split's rows in its order, stage 1 trains on it exactly as in memory (same losses, same weights, the
structure drops of each epoch), and a run killed after a checkpoint resumes at the next row."""

import hashlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets.config
import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from torch.utils.data import IterableDataset as TorchIterableDataset

from modeling_sepit import SepitDataCollator
from modeling_sepit.training_sepit import SepitSFTTrainer, SizedIterableDataset, load_training_splits

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "training" / "sft.py"
sft = runpy.run_path(str(SFT))


@pytest.fixture(autouse=True)
def no_arrow_shutdown_wait(monkeypatch) -> None:
    """A buffer-shuffled stream waits `SLEEP_TIME_ON_THREADS_SHUTDOWN` (5 s) whenever a pass over it ends, datasets'
    guard against Arrow's reader threads outliving the interpreter (apache/arrow#45214); this process outlives them."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def parts(demo_dataset, tiny_parts, tmp_path_factory) -> dict[str, Path]:
    return {"dataset": demo_dataset, "parts": tiny_parts, "root": tmp_path_factory.mktemp("streaming")}


def stage1_argv(parts: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    """Tiny stage 1 in the files' order (the in-memory sampler's `sequential`), every step logged."""
    return [
        "--config", str(ROOT / "training" / "recipes" / "tiny" / "stage1.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--protein_model_name_or_path", str(parts["parts"] / "protein_model"),
        "--language_model_name_or_path", str(parts["parts"] / "language_model"),
        "--encoder_warmup_dir", "",
        "--max_protein_length", "32",
        "--per_device_train_batch_size", "4",
        "--train_sampling_strategy", "sequential",
        "--logging_steps", "1",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def logged_losses(folder: Path) -> list[tuple[int, float]]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [(record["step"], record["loss"]) for record in state["log_history"] if "loss" in record]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(expected: Path, actual: Path) -> None:
    expected, actual = weights(expected), weights(actual)
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, different[:5]


def test_a_streamed_split_holds_the_in_memory_rows(demo_dataset, tmp_path) -> None:
    memory, _ = load_training_splits(str(demo_dataset), "captions", "train", "validation", None, with_eval=False)
    stream, validation = load_training_splits(
        str(demo_dataset), "captions", "train", "validation", None, with_eval=True, streaming=True
    )
    # A torch IterableDataset that knows its length (from the Parquet footers: nothing read yet) and is one shard.
    assert isinstance(stream, SizedIterableDataset) and isinstance(stream, TorchIterableDataset)
    assert len(stream) == len(memory) and stream.n_shards == 1
    assert len(validation) == load_dataset(str(demo_dataset), "captions", split="validation").num_rows
    assert list(stream) == list(memory)  # the files' order, the same values

    first, _ = load_training_splits(str(demo_dataset), "captions", "train", "validation", 10, False, streaming=True)
    assert len(first) == 10 and list(first) == list(memory.select(range(10)))

    def shuffled(epoch: int, cut: int | None = None) -> list[str]:
        rows, _ = load_training_splits(
            str(demo_dataset), "captions", "train", "validation", None, False, True, 0, 8, whole_batches_of=cut
        )
        rows.set_epoch(epoch)
        return [row["accession"] for row in rows]

    assert shuffled(0) == shuffled(0) != shuffled(1)  # seeded, and reshuffled at each epoch
    assert sorted(shuffled(0)) == sorted(shuffled(1)) == sorted(memory["accession"])
    cut = shuffled(1, cut=8)  # dataloader_drop_last: whole global batches of 8, a different remainder each epoch
    assert len(cut) == len(memory) // 8 * 8 and cut == shuffled(1)[: len(cut)]

    with pytest.raises(ValueError, match="dataset_train_split: .* has no split 'training'"):
        load_training_splits(str(demo_dataset), "captions", "training", "validation", None, False, streaming=True)
    json_folder = tmp_path / "json"
    json_folder.mkdir()
    (json_folder / "train.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="streaming: .*train.jsonl is not a Parquet file"):
        load_training_splits(str(json_folder), None, "train", "validation", None, False, streaming=True)


def test_streaming_refuses_length_grouping_and_an_empty_buffer(parts, capsys) -> None:
    argv = stage1_argv(parts, parts["root"] / "grouped", "--streaming", "true")
    argv[argv.index("sequential")] = "group_by_length"
    assert sft["main"](argv) == 2
    error = capsys.readouterr().err.strip()  # at argument time: before any model is loaded
    assert error.startswith("sft: error: train_sampling_strategy: 'group_by_length' needs every row's length")
    assert "\n" not in error and not (parts["root"] / "grouped").exists()
    argv = stage1_argv(parts, parts["root"] / "no-buffer", "--streaming", "true", "--shuffle_buffer_size", "0")
    assert sft["main"](argv) == 2
    assert (
        capsys.readouterr().err.strip() == "sft: error: shuffle_buffer_size must be >= 1 (rows held to shuffle), got 0"
    )


def test_streamed_stage1_trains_as_the_in_memory_one(parts, monkeypatch) -> None:
    """Two epochs of 10 batches; the last rows of each epoch carry structures, dropped with probability 0.5 by a draw
    that depends on the epoch: the stream must see epochs where the in-memory run does."""
    seen: dict[str, list[int]] = {}
    collate = SepitDataCollator.__call__

    def recording(self, examples):
        seen.setdefault(run, []).append(self.epoch)
        return collate(self, examples)

    monkeypatch.setattr(SepitDataCollator, "__call__", recording)
    common = ("--max_steps", "20", "--save_steps", "20", "--structure_dropout", "0.5")
    for run in ("memory", "stream"):
        flag = str(run == "stream").lower()
        assert sft["main"](stage1_argv(parts, parts["root"] / run, *common, "--streaming", flag)) == 0
    assert seen["memory"] == seen["stream"] == [0] * 10 + [1] * 10
    memory, stream = (parts["root"] / run / "checkpoint-20" for run in ("memory", "stream"))
    assert len(logged_losses(stream)) == 20
    assert logged_losses(stream) == logged_losses(memory)
    assert_same_weights(parts["root"] / "memory", parts["root"] / "stream")


# Runs sft.py, writing a fingerprint of every trained batch to FINGERPRINTS; after the checkpoint of step STOP it
# waits to be killed (so the kill comes after that checkpoint, whatever the machine's speed).
KILLED_RUN = """
import hashlib, os, runpy, sys, time
from modeling_sepit.training_sepit import SepitSFTTrainer

train_step, save = SepitSFTTrainer.training_step, SepitSFTTrainer._save_checkpoint

def fingerprinted(self, model, inputs, *args, **kwargs):
    with open(os.environ["FINGERPRINTS"], "a") as out:
        out.write(hashlib.sha1(inputs["input_ids"].numpy().tobytes()).hexdigest() + "\\n")
    return train_step(self, model, inputs, *args, **kwargs)

def save_then_wait(self, model, trial):
    save(self, model, trial)
    if self.state.global_step == int(os.environ["STOP"]):
        time.sleep(600)

SepitSFTTrainer.training_step, SepitSFTTrainer._save_checkpoint = fingerprinted, save_then_wait
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_killed_streamed_run_resumes_at_the_next_row(parts, tmp_path, monkeypatch) -> None:
    """12 rows, 3 batches an epoch, shuffled in a buffer of 5 anew each epoch; killed after the checkpoint of step 4
    (one batch into the second epoch), the run resumes with the second batch of the second epoch's order."""
    trained: list[str] = []
    train_step = SepitSFTTrainer.training_step

    def fingerprinted(self, model, inputs, *args, **kwargs):
        trained.append(hashlib.sha1(inputs["input_ids"].numpy().tobytes()).hexdigest())
        return train_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SepitSFTTrainer, "training_step", fingerprinted)
    common = (
        "--streaming", "true", "--train_sampling_strategy", "random", "--shuffle_buffer_size", "5",
        "--max_train_samples", "12", "--max_steps", "8", "--save_steps", "4", "--full_determinism", "true",
    )  # fmt: skip
    straight = tmp_path / "straight"
    assert sft["main"](stage1_argv(parts, straight, *common)) == 0
    straight_batches = list(trained)
    assert len(straight_batches) == 8 and straight_batches[:3] != straight_batches[3:6]  # each epoch reshuffled

    killed, fingerprints = tmp_path / "killed", tmp_path / "before-kill.txt"
    wrapper = tmp_path / "killed_run.py"
    wrapper.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINGERPRINTS": str(fingerprints), "STOP": "4"}
    process = subprocess.Popen(
        [sys.executable, str(wrapper), str(SFT), *stage1_argv(parts, killed, *common)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert fingerprints.read_text().split() == straight_batches[:4] and not (killed / "model.safetensors").exists()

    trained.clear()
    assert sft["main"](stage1_argv(parts, killed, *common, "--resume_from_checkpoint", "true")) == 0
    assert trained == straight_batches[4:]  # the batches after the checkpoint, none skipped or repeated
    assert logged_losses(killed / "checkpoint-8") == logged_losses(straight / "checkpoint-8")
    assert_same_weights(straight, killed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs sft.py (argv[1:]) as one rank, writing each batch's (epoch, accessions) to $ROWS/<rank>.txt.
ROWS_WRAPPER = """
import os, runpy, sys
from modeling_sepit import SepitDataCollator

collate = SepitDataCollator.__call__

def recording(self, examples):
    with open(os.path.join(os.environ["ROWS"], os.environ["RANK"] + ".txt"), "a") as out:
        out.write(f"{self.epoch} " + ",".join(example["accession"] for example in examples) + "\\n")
    return collate(self, examples)

SepitDataCollator.__call__ = recording
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_stream_the_rows_they_read_in_memory(parts, tmp_path) -> None:
    """10 rows, global batches of 2 x 2: 3 steps an epoch, the last one topped up from the epoch's first rows on both
    paths (Accelerate's even batches); 5 steps reach the second epoch. Each process trains on the rows it would read
    in memory, so the losses and weights are the in-memory run's."""
    wrapper = tmp_path / "rows.py"
    wrapper.write_text(ROWS_WRAPPER)
    for run in ("memory", "stream"):
        (tmp_path / run).mkdir()
        env = {**os.environ, "ROWS": str(tmp_path / run), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        argv = stage1_argv(
            parts, tmp_path / f"{run}-output", "--per_device_train_batch_size", "2", "--max_train_samples", "10",
            "--max_steps", "5", "--save_steps", "5", "--ddp_backend", "gloo", "--streaming", str(run == "stream"),
        )  # fmt: skip
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), str(wrapper), str(SFT), *argv,
        ]  # fmt: skip
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert finished.returncode == 0, finished.stderr[-3000:]
    rows = {
        run: [(tmp_path / run / f"{rank}.txt").read_text().split("\n") for rank in "01"] for run in ("memory", "stream")
    }
    assert rows["stream"] == rows["memory"]
    first = rows["stream"][0][0].split()[1].split(",") + rows["stream"][1][0].split()[1].split(",")
    assert len(set(first)) == 4 and rows["stream"][0][3].startswith("1 ")  # distinct rows per process; 2nd epoch
    memory, stream = (tmp_path / f"{run}-output" for run in ("memory", "stream"))
    assert logged_losses(stream / "checkpoint-5") == logged_losses(memory / "checkpoint-5")
    assert_same_weights(memory, stream)
