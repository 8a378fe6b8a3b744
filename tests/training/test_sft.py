"""Stages 1 and 2 (`training/sft.py`) on tiny parts and real demo data: loss falls, stage chaining through saved
folders, upcycling keeps the dense function and its activated parameters, two processes stay in sync, and a run killed
after a checkpoint resumes to the same weights as an uninterrupted one."""

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
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.training_sepit import SepitSFTTrainer, parameter_counts

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "training" / "sft.py"
RECIPES = ROOT / "training" / "recipes" / "tiny"
sft = runpy.run_path(str(SFT))
stage0 = runpy.run_path(str(ROOT / "training" / "stage0_encoder_warmup.py"))


@pytest.fixture(scope="module")
def parts(demo_dataset, tiny_parts, tmp_path_factory) -> dict[str, Path]:
    return {"dataset": demo_dataset, "parts": tiny_parts, "root": tmp_path_factory.mktemp("sft")}


def stage1_argv(parts: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(RECIPES / "stage1.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--protein_model_name_or_path", str(parts["parts"] / "protein_model"),
        "--language_model_name_or_path", str(parts["parts"] / "language_model"),
        "--encoder_warmup_dir", "",
        "--max_protein_length", "64",
        "--per_device_train_batch_size", "2",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def logged_losses(folder: Path) -> list[float]:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [record["loss"] for record in state["log_history"] if "loss" in record]


@pytest.fixture(scope="module")
def stage1(parts) -> Path:
    output = parts["root"] / "stage1"
    extra = ["--max_steps", "30", "--logging_steps", "3", "--save_steps", "30", "--learning_rate", "3e-3"]
    assert sft["main"](stage1_argv(parts, output, *extra)) == 0
    return output


def test_stage1_loss_falls_and_writes_a_loadable_folder(stage1) -> None:
    losses = logged_losses(stage1)
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    model = SepitForConditionalGeneration.from_pretrained(stage1)
    assert model.config.text_config.num_experts is None
    assert SepitProcessor.from_pretrained(stage1).protein_token_id == model.config.protein_token_id
    assert (stage1 / "loss_curve.png").stat().st_size > 1000
    assert json.loads((stage1 / "parameter_counts.json").read_text())["activated"] == parameter_counts(model)["total"]


def test_stage2_upcycles_stage1_freezes_the_encoder_and_learns(parts, stage1) -> None:
    output = parts["root"] / "stage2"
    argv = [
        "--config", str(RECIPES / "stage2.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--model_name_or_path", str(stage1),
        "--max_protein_length", "64", "--per_device_train_batch_size", "4",
        "--output_dir", str(output),
        "--max_steps", "16", "--logging_steps", "4", "--save_steps", "16", "--learning_rate", "3e-3",
    ]  # fmt: skip
    assert sft["main"](argv) == 0
    losses = logged_losses(output)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    dense, moe = load_file(stage1 / "model.safetensors"), load_file(output / "model.safetensors")
    encoder = [k for k in dense if k.startswith(("model.protein_model.", "model.structure_module."))]
    assert encoder and all(torch.equal(dense[k], moe[k]) for k in encoder)
    upcycled = SepitForConditionalGeneration.from_pretrained(output)
    assert upcycled.config.text_config.num_experts == 4 and upcycled.config.text_config.num_experts_per_tok == 1
    counts = json.loads((output / "parameter_counts.json").read_text())
    assert counts["activated"] == parameter_counts(SepitForConditionalGeneration.from_pretrained(stage1))["total"]
    assert counts["total"] > counts["activated"] and counts["router"] > 0


def test_upcycled_model_at_step_zero_computes_what_the_dense_one_did(parts, stage1) -> None:
    processor = SepitProcessor.from_pretrained(stage1)
    dense = SepitForConditionalGeneration.from_pretrained(stage1).eval()
    batch_rows = load_dataset(str(parts["dataset"]), "instructions", split="train").select(range(4)).to_list()
    proteins = [[{k: row[k] for k in ("sequence", "coords", "coords_mask")}] for row in batch_rows]
    batch = processor.apply_chat_template(
        [row["messages"] for row in batch_rows],
        proteins=proteins,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"padding": True},
    )
    with torch.no_grad():
        expected = dense(**batch).logits
        moe = dense.upcycle_to_moe(num_experts=4, num_experts_per_tok=1)
        for layer in moe.model.language_model.layers:  # any router: renormalised top-1 weights are exactly 1
            torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
        actual = moe(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SYNC_WRAPPER = """
import gc, hashlib, os, runpy, sys
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer
from modeling_sepit import training_sepit
end = Trainer.end
def end_and_count_wrappers(self):
    gc.collect()
    alive = sum(isinstance(item, DistributedDataParallel) for item in gc.get_objects())
    with open(os.path.join(os.environ["FINGERPRINTS"], f"ddp{os.environ['RANK']}.txt"), "w") as handle:
        handle.write(str(alive))
    return end(self)
Trainer.end = end_and_count_wrappers
train = training_sepit.SepitSFTTrainer.train
def train_and_fingerprint(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    digest = hashlib.sha256()
    for name, parameter in sorted(self.model.named_parameters()):
        digest.update(name.encode() + parameter.detach().cpu().numpy().tobytes())
    path = os.path.join(os.environ["FINGERPRINTS"], f"rank{os.environ['RANK']}.txt")
    with open(path, "w") as handle:
        handle.write(f"{digest.hexdigest()} {self.state.global_step}")
    return result
training_sepit.SepitSFTTrainer.train = train_and_fingerprint
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_train_stage1_in_sync(parts, tmp_path) -> None:
    wrapper = tmp_path / "fingerprint.py"
    wrapper.write_text(SYNC_WRAPPER)
    env = {**os.environ, "FINGERPRINTS": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(wrapper), str(SFT),
        *stage1_argv(parts, tmp_path / "ddp", "--max_steps", "3", "--save_steps", "3", "--ddp_backend", "gloo"),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    fingerprints = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1] and fingerprints[0][1] == "3"
    # The DDP wrapper is gone before the process group is destroyed (`end_training`): freed at exit, it can hang Gloo.
    assert [(tmp_path / f"ddp{rank}.txt").read_text() for rank in (0, 1)] == ["0", "0"]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_killed_run_resumes_to_the_same_weights(parts, tmp_path) -> None:
    common = ("--max_steps", "6", "--save_steps", "2", "--logging_steps", "2", "--full_determinism", "true")
    straight = tmp_path / "straight"
    assert sft["main"](stage1_argv(parts, straight, *common)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(SFT), *stage1_argv(parts, killed, *common)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists()
    assert sft["main"](stage1_argv(parts, killed, *common, "--resume_from_checkpoint", "true")) == 0

    expected, actual = _weights(straight), _weights(killed)
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, different[:5]


def test_stages_chain_through_saved_folders(parts) -> None:
    """0 -> 1 -> 2: stage 1 starts from the stage-0 encoder (kept frozen here, so it must arrive unchanged)."""
    warmup = parts["root"] / "chain-stage0"
    assert stage0["main"]([
        "--config", str(RECIPES / "stage0.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--protein_model_name_or_path", str(parts["parts"] / "protein_model"),
        "--text_encoder_name_or_path", str(parts["parts"] / "text_encoder"),
        "--max_protein_length", "64", "--per_device_train_batch_size", "4",
        "--max_steps", "3", "--save_steps", "3", "--output_dir", str(warmup),
    ]) == 0  # fmt: skip
    captions = parts["root"] / "chain-stage1"
    argv = stage1_argv(parts, captions, "--max_steps", "3", "--save_steps", "3")
    argv[argv.index("--encoder_warmup_dir") + 1] = str(warmup)
    assert sft["main"]([*argv, "--freeze", "protein_model", "structure_module"]) == 0
    warmed, tuned = load_file(warmup / "model.safetensors"), load_file(captions / "model.safetensors")
    encoder = [k for k in tuned if k.startswith(("model.protein_model.encoder.", "model.structure_module."))]
    assert encoder and all(torch.equal(warmed[k], tuned[k]) for k in encoder)
    instructions = parts["root"] / "chain-stage2"
    assert sft["main"]([
        "--config", str(RECIPES / "stage2.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--model_name_or_path", str(captions),
        "--max_protein_length", "64", "--per_device_train_batch_size", "4",
        "--max_steps", "3", "--save_steps", "3", "--output_dir", str(instructions),
    ]) == 0  # fmt: skip
    final = SepitForConditionalGeneration.from_pretrained(instructions)
    assert final.config.text_config.num_experts == 4


def test_a_checkpoint_interrupted_while_written_never_becomes_the_last_one(parts, tmp_path, monkeypatch) -> None:
    output = tmp_path / "interrupted"
    argv = stage1_argv(parts, output, "--max_steps", "6", "--save_steps", "2", "--logging_steps", "2")
    write_rng_state = SepitSFTTrainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # model and optimizer already written: the process dies mid-checkpoint
            raise RuntimeError("killed while writing checkpoint-4")
        return write_rng_state(self, output_dir)

    monkeypatch.setattr(SepitSFTTrainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(RuntimeError, match="killed while writing"):
        sft["main"](argv)
    assert [path.name for path in output.glob("checkpoint-*")] == ["checkpoint-2"]
    assert get_last_checkpoint(str(output)).endswith("checkpoint-2")
    monkeypatch.undo()
    assert sft["main"]([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_trls_own_sft_trainer_trains_the_model_with_the_processors_collator(parts, tmp_path) -> None:
    """TRL's `SFTTrainer` as its docs show it, on the model, the processor and the collator the processor gives
    (reachable from any saved folder). The two `SFTConfig` settings are the ones TRL's design requires for rows whose
    proteins are tensors built at collation: TRL's own dataset preparation keeps only `input_ids`/`labels` columns
    for non-image data, so it would drop the proteins (shown below)."""
    from trl import SFTConfig, SFTTrainer

    protein, language = parts["parts"] / "protein_model", parts["parts"] / "language_model"
    processor = SepitProcessor.from_pretrained_parts(protein, language, max_protein_length=64)
    model = SepitForConditionalGeneration.from_pretrained_parts(protein, language)
    train = load_dataset(str(parts["dataset"]), "instructions")["train"]
    with_structure = [i for i, source in enumerate(train["structure_source"]) if source][:4]
    rows = train.select([*with_structure, *range(4)])
    # bf16=False: TRL defaults to bf16, which needs a GPU (or use_cpu=True); this machine has none.
    settings = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "bf16": False,
    }
    with pytest.raises(ValueError, match="`<protein>` tags but 0 proteins"):
        SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=rows, processing_class=processor)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **settings,
            logging_steps=1,
            learning_rate=1e-3,
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=rows,
        processing_class=processor,
        data_collator=processor.get_data_collator(structure_dropout=0.0, seed=0),
    )
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    changed = {name.split(".")[1] for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"protein_model", "structure_module", "multi_modal_projector", "language_model"} <= changed
