"""Stages 0, 1 and 2 under `accelerate launch` with the shipped FSDP2 and DeepSpeed ZeRO-2/3 configs, on 2 CPU processes
(gloo): the losses equal a 1-process run with the same global batch, a run killed after a checkpoint resumes to the
same weights, and the final folder loads with `from_pretrained` and computes what the 1-process model computes.

The shipped configs are the GPU ones; each test derives its CPU config from one of them, changing only the process count
(and `use_cpu` for FSDP, whose processes are CPU ones; DeepSpeed needs `use_cpu: false` with gloo, see check_launch).
The 1-process reference takes each global batch of 4 rows as the two processes do, in two micro-batches of 2 (gradient
accumulation): stage 2's load-balancing loss is a mean per micro-batch (as TRL's and the original's), not per global
batch; stage 0's takes it as one batch of 4, since its contrastive negatives are the whole global batch (gathered
across processes). Tolerance: the 2-process runs sum gradients across processes (gloo) in another order; measured here,
losses and weights agree with the 1-process run to ~1e-7 after four steps at learning rate 1e-3 (relative 1e-5 and
absolute 2e-5 are asserted), while a lost optimizer state, a skipped or repeated batch or a wrong gradient average
(the LM-head bug this guards against was 1.3x) moves them by 1e-3 or more."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import TrainingArguments

from modeling_sepit import (
    SepitForConditionalGeneration,
    SepitForProteinPretraining,
    SepitPretrainingCollator,
    SepitProcessor,
)
from modeling_sepit.training_sepit import check_launch, parameter_counts

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "training" / "sft.py"
STAGE0 = ROOT / "training" / "stage0_encoder_warmup.py"
RECIPES = ROOT / "training" / "recipes" / "tiny"
CONFIGS = ROOT / "training" / "accelerate"
ENGINES = {"fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
MAX_STEPS, SAVE_STEPS = 4, 2
RTOL, ATOL = 1e-5, 2e-5
# Run by each launched process instead of the script: pauses after the checkpoint of step SEPIT_TEST_PAUSE_AT (so the
# test kills the run there, not after it ended) and records the FSDP units of the trained model.
WRAPPER = """
import json, os, runpy, sys, time
from torch.distributed.fsdp import FSDPModule
from modeling_sepit import training_sepit
save = training_sepit.AtomicCheckpointMixin._save_checkpoint
def save_then_pause(self, model, trial):
    save(self, model, trial)
    if self.state.global_step == int(os.environ.get("SEPIT_TEST_PAUSE_AT", "-1")):
        time.sleep(600)
training_sepit.AtomicCheckpointMixin._save_checkpoint = save_then_pause
end_training = training_sepit.end_training
def record_units_and_end(trainer):
    if trainer.is_world_process_zero():
        units = [next(c.__name__ for c in type(m).__mro__ if not issubclass(c, FSDPModule))
                 for m in trainer.model.modules() if isinstance(m, FSDPModule)]
        with open(os.path.join(trainer.args.output_dir, "fsdp_units.json"), "w") as handle:
            json.dump(units, handle)
    end_training(trainer)
training_sepit.end_training = record_units_and_end
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cpu_config(engine: str, folder: Path) -> Path:
    """The shipped config of `engine` with 2 processes (FSDP: CPU processes), written under `folder`."""
    config = yaml.safe_load((CONFIGS / ENGINES[engine]).read_text())
    config["num_processes"] = 2
    config["use_cpu"] = engine == "fsdp"
    path = folder / f"{engine}-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def parts(demo_dataset, tiny_parts, tmp_path_factory) -> dict[str, Path]:
    """The tiny parts without dropout: the runs compared draw their random numbers in different orders."""
    root = tmp_path_factory.mktemp("distributed")
    copied = root / "parts"
    shutil.copytree(tiny_parts, copied)
    for part in ("protein_model", "text_encoder"):
        path = copied / part / "config.json"
        config = json.loads(path.read_text())
        config.update(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        path.write_text(json.dumps(config))
    (root / "wrapper.py").write_text(WRAPPER)
    return {"dataset": demo_dataset, "parts": copied, "root": root}


def stage1_argv(parts: dict[str, Path], output_dir: Path, accumulation: int = 1) -> list[str]:
    return [
        "--config", str(RECIPES / "stage1.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--protein_model_name_or_path", str(parts["parts"] / "protein_model"),
        "--language_model_name_or_path", str(parts["parts"] / "language_model"),
        "--encoder_warmup_dir", "",
        *common_argv(output_dir, accumulation),
    ]  # fmt: skip


def stage2_argv(stage1: Path, parts: dict[str, Path], output_dir: Path, accumulation: int = 1) -> list[str]:
    return [
        "--config", str(RECIPES / "stage2.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--model_name_or_path", str(stage1),
        *common_argv(output_dir, accumulation),
    ]  # fmt: skip


def common_argv(output_dir: Path, accumulation: int) -> list[str]:
    """Rows in file order and no structure dropout: a global batch of 4 holds the same micro-batches of 2, drawn the
    same way, whether one process accumulates both or two processes take one each."""
    return [
        "--output_dir", str(output_dir),
        "--max_protein_length", "64", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", str(accumulation),
        "--train_sampling_strategy", "sequential", "--structure_dropout", "0",
        "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--disable_tqdm", "true",
    ]  # fmt: skip


def one_process(script: Path, argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(script), *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


def launch(engine: str, parts: dict[str, Path], script: Path, argv: list[str], pause_at: int | None = None):
    """`accelerate launch` of `script` on 2 CPU processes with `engine`'s config; with `pause_at`, returns once the
    checkpoint of that step is complete, having killed every process of the run (SIGKILL)."""
    extra = ["--use_cpu", "false", "--ddp_backend", "gloo"] if engine != "fsdp" else []
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config(engine, parts["root"])),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(parts["root"] / "wrapper.py"), str(script), *argv, *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "SEPIT_TEST_PAUSE_AT": str(pause_at or -1),
    }
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    log = output_dir.with_name(output_dir.name + f"-{pause_at or 'run'}.log")
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            if pause_at is None:
                assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
                return
            deadline = time.monotonic() + 400
            while not (output_dir / f"checkpoint-{pause_at}" / "trainer_state.json").exists():
                assert process.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.2)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def losses(folder: Path, step: int = MAX_STEPS) -> list[float]:
    state = json.loads((folder / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [record["loss"] for record in state["log_history"] if "loss" in record]


def killed_and_resumed(engine, parts, script, argv) -> Path:
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    launch(engine, parts, script, argv, pause_at=SAVE_STEPS)
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / f"checkpoint-{MAX_STEPS}").exists()
    launch(engine, parts, script, [*argv, "--resume_from_checkpoint", "true"])
    return output_dir


def assert_same_run(
    actual: Path,
    expected: Path,
    batch: dict,
    model_class: type = SepitForConditionalGeneration,
    outputs: tuple[str, ...] = ("logits",),
) -> None:
    """Same losses at every step, same final weights, and the folder, loaded with `from_pretrained`, computes the
    `outputs` the 1-process model computes."""
    torch.testing.assert_close(torch.tensor(losses(actual)), torch.tensor(losses(expected)), rtol=RTOL, atol=ATOL)
    saved, reference = load_file(actual / "model.safetensors"), load_file(expected / "model.safetensors")
    assert saved.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(saved[name], reference[name], rtol=RTOL, atol=ATOL, msg=name)
    model = model_class.from_pretrained(actual).eval()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)  # the gathered weights, as saved
    with torch.no_grad():
        computed = model(**batch)
        reference = model_class.from_pretrained(expected).eval()(**batch)
    for name in outputs:
        torch.testing.assert_close(computed[name], reference[name], rtol=1e-4, atol=1e-4, msg=name)


def engine_available(engine: str) -> None:
    if engine != "fsdp":
        pytest.importorskip("deepspeed", reason="DeepSpeed engines need the deepspeed extra: pip install .[deepspeed]")


@pytest.fixture(scope="module")
def batch(parts) -> dict:
    rows = load_dataset(str(parts["dataset"]), "instructions", split="train").select(range(3)).to_list()
    processor = SepitProcessor.from_pretrained_parts(
        parts["parts"] / "protein_model", parts["parts"] / "language_model", max_protein_length=64
    )
    proteins = [[{k: row[k] for k in ("sequence", "coords", "coords_mask")}] for row in rows]
    return processor.apply_chat_template(
        [row["messages"] for row in rows],
        proteins=proteins,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"padding": True},
    )


@pytest.fixture(scope="module")
def stage1_reference(parts) -> Path:
    output = parts["root"] / "stage1-one-process"
    one_process(SFT, stage1_argv(parts, output, accumulation=2))
    return output


@pytest.fixture(scope="module")
def stage2_reference(parts, stage1_reference) -> Path:
    output = parts["root"] / "stage2-one-process"
    one_process(SFT, stage2_argv(stage1_reference, parts, output, accumulation=2))
    return output


def test_shipped_configs_parse_and_the_cpu_ones_change_only_the_sizes(tmp_path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {"fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    for engine, name in ENGINES.items():
        shipped = ClusterConfig.from_yaml_file(CONFIGS / name)
        assert shipped.distributed_type == expected[engine] and not shipped.use_cpu
        derived = yaml.safe_load(cpu_config(engine, tmp_path).read_text())
        original = yaml.safe_load((CONFIGS / name).read_text())
        assert {key for key in original if original[key] != derived[key]} <= {"num_processes", "use_cpu"}
    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert "SepitSparseMoeBlock" in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")


def test_deepspeed_under_use_cpu_is_refused_not_dropped(monkeypatch, tmp_path) -> None:
    """Accelerate ignores DeepSpeed when use_cpu is set and would train with plain DDP, silently."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="use_cpu: Accelerate ignores DeepSpeed"):
        check_launch(args)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_stage1_two_processes_killed_and_resumed_equal_one_process(engine, parts, stage1_reference, batch) -> None:
    engine_available(engine)
    output = parts["root"] / f"stage1-{engine}"
    resumed = killed_and_resumed(engine, parts, SFT, stage1_argv(parts, output))
    assert_same_run(resumed, stage1_reference, batch)
    config = json.loads((resumed / "config.json").read_text())
    assert set(config["auto_map"].values()) <= {
        "configuration_sepit.SepitConfig",
        "modeling_sepit.SepitForConditionalGeneration",
    }  # FSDP2's generated class is not what the folder names
    assert not list(resumed.glob("_fsdp*.py"))
    if engine == "fsdp":
        units = json.loads((resumed / "fsdp_units.json").read_text())
        assert units.count("LlamaDecoderLayer") == 2 and "EsmLayer" in units


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_stage2_moe_two_processes_killed_and_resumed_equal_one_process(
    engine, parts, stage1_reference, stage2_reference, batch
) -> None:
    engine_available(engine)
    output = parts["root"] / f"stage2-{engine}"
    resumed = killed_and_resumed(engine, parts, SFT, stage2_argv(stage1_reference, parts, output))
    assert_same_run(resumed, stage2_reference, batch)
    counts = json.loads((resumed / "parameter_counts.json").read_text())
    dense = parameter_counts(SepitForConditionalGeneration.from_pretrained(stage1_reference))
    assert counts == json.loads((stage2_reference / "parameter_counts.json").read_text())
    assert counts["activated"] == dense["total"] and counts["total"] > counts["activated"]
    load, expected_load = (
        json.loads((folder / "expert_load.json").read_text()) for folder in (resumed, stage2_reference)
    )
    torch.testing.assert_close(torch.tensor(load), torch.tensor(expected_load), rtol=0, atol=1e-3)
    if engine == "fsdp":  # each MoE block (router + its experts) is a sharded unit inside its decoder layer's
        units = json.loads((resumed / "fsdp_units.json").read_text())
        assert units.count("SepitSparseMoeBlock") == 2 and units.count("LlamaDecoderLayer") == 2


UNUSED_ON_ONE_PROCESS = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from modeling_sepit.training_sepit import give_every_parameter_a_gradient
dist.init_process_group("gloo")
rank = dist.get_rank()
class Block(torch.nn.Module):  # `b` is used on process 0 only, as a structure module on a batch with structures
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    def forward(self, x, use_b):
        return self.a(x) + self.b(x) if use_b else self.a(x)
torch.manual_seed(0)
block = Block()
fully_shard(block)
give_every_parameter_a_gradient(block)
block(torch.ones(2, 4), rank == 0).sum().backward()
grad = block.b.weight.grad.full_tensor()
if rank == 0:
    torch.save(grad, sys.argv[1])
dist.destroy_process_group()
"""


def test_a_parameter_unused_on_one_process_gets_a_gradient_under_fsdp2(tmp_path) -> None:
    """Without `give_every_parameter_a_gradient` the processes reduce-scatter different sets of gradients (gloo:
    "Received data size doesn't match expected size"); with it, the unused parameter's zero gradient joins the mean."""
    script = tmp_path / "unused.py"
    script.write_text(UNUSED_ON_ONE_PROCESS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(script), str(tmp_path / "grad.pt"),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    # d(sum(b(x)))/dW = 2 per entry (two rows of ones) on process 0, 0 on process 1: their mean is 1.
    torch.testing.assert_close(torch.load(tmp_path / "grad.pt", weights_only=True), torch.ones(4, 4))


STAGE0_BATCH = 4  # the global batch: 4 rows on one process, 2 on each of two


def stage0_argv(parts: dict[str, Path], output_dir: Path, per_device_batch: int) -> list[str]:
    """No masked residues (`mlm_probability` 0), on rows without structures (so no coordinate noise): each process
    draws its corruption from the same seed, so one process and two would mask and noise different residues; what is
    left, the contrastive loss with its negatives gathered across processes, is what the engines must not change."""
    return [
        "--config", str(RECIPES / "stage0.yaml"),
        "--dataset_name", str(parts["dataset"]),
        "--protein_model_name_or_path", str(parts["parts"] / "protein_model"),
        "--text_encoder_name_or_path", str(parts["parts"] / "text_encoder"),
        "--output_dir", str(output_dir),
        "--max_protein_length", "64", "--max_caption_length", "32", "--num_gaussian_kernels", "16",
        "--projection_dim", "32", "--mlm_probability", "0", "--per_device_train_batch_size", str(per_device_batch),
        "--train_sampling_strategy", "sequential",
        "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--logging_steps", "1",
        # 1e-4, not 1e-3: Adam turns a summation-order difference in a near-zero gradient into an update difference of
        # up to the learning rate (1e-3 gave 1.6e-5 against the 2e-5 bound, and collapsed the tiny embeddings).
        "--learning_rate", "1e-4", "--warmup_steps", "0", "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stage0_rows(parts) -> list[dict]:
    rows = load_dataset(str(parts["dataset"]), "captions", split="train").select(range(MAX_STEPS * STAGE0_BATCH))
    # The comparison holds only without coordinate noise (see stage0_argv): the rows trained on have no structure.
    assert all(row["coords"] is None for row in rows), "stage-0 rows with structures: pick sequence-only rows"
    return rows.to_list()


@pytest.fixture(scope="module")
def stage0_reference(parts, stage0_rows) -> Path:
    output = parts["root"] / "stage0-one-process"
    one_process(STAGE0, stage0_argv(parts, output, STAGE0_BATCH))
    return output


@pytest.mark.parametrize("engine", list(ENGINES))
def test_stage0_two_processes_killed_and_resumed_equal_one_process(
    engine, parts, stage0_rows, stage0_reference
) -> None:
    engine_available(engine)
    output = parts["root"] / f"stage0-{engine}"
    resumed = killed_and_resumed(engine, parts, STAGE0, stage0_argv(parts, output, STAGE0_BATCH // 2))
    collator = SepitPretrainingCollator.from_pretrained(resumed, max_protein_length=64, max_caption_length=32)
    batch = collator(stage0_rows[:3])
    masked = torch.zeros_like(batch["protein_attention_mask"], dtype=torch.bool)
    batch.update(masked_positions=masked, coordinate_noise=torch.zeros((*masked.shape, 3)))
    outputs = ("loss", "logits_per_protein", "protein_embeds", "masked_residue_logits")
    assert_same_run(resumed, stage0_reference, batch, SepitForProteinPretraining, outputs)
    assert load_file(resumed / "model.safetensors")["logit_scale"].shape == (1,)
    if engine == "fsdp":
        units = json.loads((resumed / "fsdp_units.json").read_text())
        assert "EsmLayer" in units
