"""Stage 0 (`training/stage0_encoder_warmup.py`) on tiny parts and real demo data: the collator's alignment, the losses
fall with each component logged, the folder feeds stage 1, two processes stay in sync and contrast against each
other's captions, and a run killed after a checkpoint resumes to the same weights as an uninterrupted one."""

import json
import math
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
import yaml
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from trl import TrlParser

from modeling_sepit import (
    SepitForConditionalGeneration,
    SepitForProteinPretraining,
    SepitPretrainingCollator,
    load_pretrained_encoder,
)
from modeling_sepit.modeling_sepit_pretraining import MAX_LOGIT_SCALE, SepitOriginalMaskedResidueHead

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training" / "stage0_encoder_warmup.py"
stage0 = runpy.run_path(str(SCRIPT))
COMPONENTS = ("contrastive_loss", "denoising_loss", "masked_residue_loss")
MAX_STEPS, SAVE_STEPS, LOGGING_STEPS = 48, 16, 4


def stage0_argv(dataset: Path, parts: Path, output_dir: Path, *extra: str) -> list[str]:
    """The tiny recipe, cut down so that a step takes a fraction of a second on one CPU thread."""
    return [
        "--config", str(ROOT / "training" / "recipes" / "tiny" / "stage0.yaml"),
        "--dataset_name", str(dataset),
        "--protein_model_name_or_path", str(parts / "protein_model"),
        "--text_encoder_name_or_path", str(parts / "text_encoder"),
        "--output_dir", str(output_dir),
        "--max_protein_length", "64", "--max_caption_length", "32", "--num_gaussian_kernels", "16",
        "--projection_dim", "32", "--per_device_train_batch_size", "8", "--learning_rate", "3e-4",
        "--warmup_steps", "2", "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS),
        "--logging_steps", str(LOGGING_STEPS),
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    # One thread, as in this process (`one_thread`): the same kernels, hence the same bits.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU cores are shared with other jobs: one thread per process is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight_run(demo_dataset, tiny_parts, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("stage0") / "straight"
    assert stage0["main"](stage0_argv(demo_dataset, tiny_parts, output)) == 0
    return output


def loss_records(folder: Path) -> list[dict]:
    state = json.loads((folder / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [record for record in state["log_history"] if "loss" in record]


def test_collator_aligns_coordinates_with_tokens_and_truncates(demo_dataset, tiny_parts, tmp_path) -> None:
    rows = load_dataset(str(demo_dataset), "captions", split="train")
    lysozyme = next(row for row in rows if row["accession"] == "P00698")  # 147 residues, structure from residue 19
    short = min(rows, key=lambda row: len(row["sequence"]))  # no structure
    protein_tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "protein_model")
    text_tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "text_encoder")
    collator = SepitPretrainingCollator(
        protein_tokenizer, text_tokenizer, max_protein_length=100, max_caption_length=16
    )
    batch = collator([lysozyme, short])

    kept = 100
    expected_ids = protein_tokenizer(lysozyme["sequence"][:kept])["input_ids"]
    assert batch["protein_input_ids"].shape == (2, kept + 2)
    assert batch["protein_input_ids"][0].tolist() == expected_ids  # <cls>, 100 residues, <eos>
    mask = torch.tensor(lysozyme["coords_mask"][:kept])
    assert mask.any() and not mask.all()
    assert torch.equal(batch["protein_coords_mask"][0], torch.cat([torch.tensor([False]), mask, torch.tensor([False])]))
    coords = torch.tensor(lysozyme["coords"][:kept])
    assert torch.equal(batch["protein_coords"][0, 1 : kept + 1][mask], coords[mask])

    length = len(short["sequence"])
    assert batch["protein_attention_mask"][1].tolist() == [1] * (length + 2) + [0] * (kept - length)
    assert not batch["protein_coords_mask"][1].any()
    assert batch["caption_input_ids"].shape == (2, 16) and batch["caption_attention_mask"].all()

    collator.save_pretrained(tmp_path)
    reloaded = SepitPretrainingCollator.from_pretrained(tmp_path, max_protein_length=100, max_caption_length=16)
    assert all(torch.equal(reloaded([lysozyme, short])[key], value) for key, value in batch.items())


def test_new_modules_train_at_their_scale_and_esm2_and_the_temperature_at_the_base_rate(tiny_parts, tmp_path) -> None:
    """The original's groups (its `CLIPPretrainTrainer`): the structure module, projections and heads at
    `new_modules_lr_scale` x the base rate; ESM-2 and the contrastive temperature at the base rate. The script also
    builds the original's masked-residue head on request."""
    args = stage0["Stage0Arguments"](
        dataset_name="unused",
        protein_model_name_or_path=str(tiny_parts / "protein_model"),
        text_encoder_name_or_path=str(tiny_parts / "text_encoder"),
        projection_dim=64,
        masked_residue_head_type="original",
    )
    model, _ = stage0["load_model_and_collator"](args)
    assert isinstance(model.masked_residue_head, SepitOriginalMaskedResidueHead)
    assert model.config.position_head_dropout == 0.1
    training_args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-6, report_to="none")
    trainer = stage0["SepitPretrainingTrainer"](model=model, args=training_args, new_modules_lr_scale=10.0)
    rates = {id(p): group["lr"] for group in trainer.create_optimizer().param_groups for p in group["params"]}
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == {name for name in trained if id(trained[name]) in rates}
    assert not any(name.startswith("text_encoder.") for name in trained)
    for name, parameter in trained.items():
        base = name.startswith("model.protein_model.") or name == "logit_scale"
        assert rates[id(parameter)] == pytest.approx(1e-6 if base else 1e-5), name
    for prefix in ("model.structure_module.", "protein_projection.", "position_head.", "masked_residue_head."):
        assert any(name.startswith(prefix) for name in trained), prefix


@pytest.mark.parametrize("llm", ["paper-tinyllama", "paper-openllama3b", "paper-llama2-7b"])
def test_paper_stage0_recipes_train_as_the_original(llm) -> None:
    """config/stage0.yaml of the original with its DeepSpeed zero3.json: lr 1e-6, 10x for the new modules, no gradient
    clipping (zero3.json sets none, and the Trainer leaves clipping to DeepSpeed)."""
    recipe = ROOT / "training" / "recipes" / llm / "stage0.yaml"
    settings = yaml.safe_load(recipe.read_text())
    parser = TrlParser((stage0["Stage0Arguments"], TrainingArguments))
    script_args, training_args = parser.parse_args_and_config(args=["--config", str(recipe), "--bf16", "false"])
    assert settings["bf16"] is True
    assert training_args.max_grad_norm == 0 and training_args.learning_rate == 1e-6
    assert script_args.new_modules_lr_scale == 10.0 and script_args.mlm_probability == 0.15
    assert script_args.projection_dim == 512 and script_args.max_caption_length == 512
    assert (training_args.num_train_epochs, training_args.per_device_train_batch_size) == (10, 4)


def test_losses_fall_and_each_component_is_logged(straight_run) -> None:
    records = loss_records(straight_run)
    assert len(records) == MAX_STEPS // LOGGING_STEPS
    for record in records:
        assert all(math.isfinite(record[name]) and record[name] >= 0 for name in COMPONENTS), record
        # Averaged over the same steps as `loss`, the components add up to it (all weights are 1).
        assert sum(record[name] for name in COMPONENTS) == pytest.approx(record["loss"], rel=1e-5)
    assert any(record["denoising_loss"] > 0 for record in records)  # lysozyme's structure was denoised
    for name, ratio in (("loss", 0.85), ("contrastive_loss", 0.75)):
        losses = [record[name] for record in records]
        assert sum(losses[-2:]) / 2 < ratio * sum(losses[:2]) / 2, (name, losses)


def test_output_folder_reloads_and_its_encoder_feeds_stage1(straight_run, tiny_parts) -> None:
    assert (straight_run / "loss_curve.png").stat().st_size > 1000
    model = SepitForProteinPretraining.from_pretrained(straight_run)
    assert model.config.num_gaussian_kernels == 16 and model.config.projection_dim == 32
    assert SepitPretrainingCollator.from_pretrained(straight_run).protein_tokenizer.mask_token_id == (
        model.config.protein_config.mask_token_id
    )
    stage1 = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model", num_gaussian_kernels=16
    )
    esm = load_file(tiny_parts / "protein_model" / "model.safetensors")
    weight = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(model.model.protein_model.get_parameter(weight), esm[f"esm.{weight}"])  # it trained
    load_pretrained_encoder(stage1, straight_run)
    for name in ("protein_model", "structure_module"):
        expected = getattr(model.model, name).state_dict()
        for key, value in getattr(stage1.model, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs the script under torchrun; each process saves its parameters after training, and the embeddings and logits of
# its first training forward pass.
DDP_WRAPPER = """
import os, runpy, sys
import torch
from torch.nn.modules.module import register_module_forward_hook
from transformers import Trainer
from modeling_sepit import SepitForProteinPretraining

first = {}

def keep_first_forward(module, args, output):
    if isinstance(module, SepitForProteinPretraining) and module.training and not first:
        names = ("logits_per_protein", "protein_embeds", "caption_embeds")
        first.update({name: getattr(output, name).detach().clone() for name in names})
        first["logit_scale"] = module.logit_scale.detach().clone()

register_module_forward_hook(keep_first_forward)
train = Trainer.train

def train_and_dump(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    parameters = {name: p.detach().clone() for name, p in self.model.named_parameters()}
    dump = {"parameters": parameters, "first": first, "step": self.state.global_step}
    torch.save(dump, os.path.join(os.environ["STAGE0_DUMPS"], f"rank{os.environ['RANK']}.pt"))
    return result

Trainer.train = train_and_dump
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_stay_in_sync_and_use_each_others_captions(demo_dataset, tiny_parts, tmp_path) -> None:
    wrapper = tmp_path / "dump_ranks.py"
    wrapper.write_text(DDP_WRAPPER)
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(wrapper), str(SCRIPT),
        *stage0_argv(demo_dataset, tiny_parts, output, "--per_device_train_batch_size", "2", "--max_steps", "4",
                     "--save_steps", "4", "--logging_steps", "2", "--ddp_backend", "gloo",
                     "--eval_strategy", "steps", "--eval_steps", "4", "--per_device_eval_batch_size", "2"),
    ]  # fmt: skip
    env = {**subprocess_env(), "STAGE0_DUMPS": str(tmp_path)}
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]

    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert ranks[0]["parameters"].keys() == ranks[1]["parameters"].keys()
    for name, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][name]), name
    saved = load_file(output / "model.safetensors")
    assert all(torch.equal(saved[name], value) for name, value in ranks[0]["parameters"].items())

    # Each process scored its 2 proteins against the 4 captions of both processes, its own first.
    first = [rank["first"] for rank in ranks]
    captions = torch.cat([rank["caption_embeds"] for rank in first])
    assert not torch.allclose(first[0]["caption_embeds"], first[1]["caption_embeds"])
    for rank in first:
        assert rank["logits_per_protein"].shape == (2, 4)
        scale = rank["logit_scale"].clamp(0.0, MAX_LOGIT_SCALE).exp()
        expected = scale * rank["protein_embeds"] @ captions.T
        torch.testing.assert_close(rank["logits_per_protein"], expected, rtol=1e-5, atol=1e-5)
    logged = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert all(name in logged[0] for name in COMPONENTS)
    evaluation = next(record for record in logged if "eval_loss" in record)
    assert sum(evaluation[f"eval_{name}"] for name in COMPONENTS) == pytest.approx(evaluation["eval_loss"], rel=1e-5)


def test_killed_run_resumes_to_the_same_weights(straight_run, demo_dataset, tiny_parts, tmp_path, monkeypatch) -> None:
    killed = tmp_path / "killed"
    argv = stage0_argv(demo_dataset, tiny_parts, killed)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    checkpoints = list(killed.glob("checkpoint-*"))
    assert checkpoints and all((path / "trainer_state.json").is_file() for path in checkpoints)  # whole or absent
    resumed_from = get_last_checkpoint(str(killed))

    # A run that started over would reach the same weights too: record the steps the resumed run takes.
    trainer_class, steps = stage0["SepitPretrainingTrainer"], []
    compute_loss = trainer_class.compute_loss

    def recording_compute_loss(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "compute_loss", recording_compute_loss)
    assert stage0["main"]([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert steps == list(range(int(resumed_from.rsplit("-", 1)[1]), MAX_STEPS))
    expected, actual = load_file(straight_run / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, different[:5]
