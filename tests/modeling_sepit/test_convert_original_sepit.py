"""The converter reproduces the original release's outputs on its three fixtures, and rejects broken inputs."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.convert_original_sepit import convert, kernel_report, main, verify_conversion
from tests.conftest import ORIGINAL

CASES = ["original-tiny-dense", "original-tiny-moe-top1", "original-tiny-moe-top2"]


@pytest.fixture(scope="module", params=CASES)
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / request.param
    convert(ORIGINAL / request.param, folder)
    model = SepitForConditionalGeneration.from_pretrained(folder).eval()
    expected = load_file(ORIGINAL / request.param / "expected_outputs.safetensors")
    batches = {}
    for key, tensor in expected.items():
        batch, name = key.split(".", 1)
        batches.setdefault(batch, {})[name] = tensor
    return request.param, model, batches


def test_config_of_converted_model(converted):
    case, model, _ = converted
    config = model.config
    assert config.original_compat and config.structure_embedding_scale == 0.0
    assert config.protein_token_id == 63 and config.num_gaussian_kernels == 128
    if case == "original-tiny-dense":
        assert config.num_experts is None
    else:
        assert (config.num_experts, config.norm_topk_prob) == (4, False)
        assert config.num_experts_per_tok == (1 if case.endswith("top1") else 2)


def test_structure_bias_parity(converted):
    _, model, batches = converted
    for batch in batches.values():
        coords = batch["node_position"]
        present = (coords != 0).any(-1) & batch["protein_attention_mask"].bool()
        with torch.no_grad():
            bias, _ = model.model.structure_module(coords, present)
        # The release adds the bias on the [1:-1] block only.
        assert (bias[:, :, 1:-1, 1:-1] - batch["protein_attention_bias"][:, :, 1:-1, 1:-1]).abs().max() <= 1e-4


def test_training_forward_and_generation_parity(converted):
    _, model, _ = converted
    figures = verify_conversion(model, ORIGINAL / converted[0] / "expected_outputs.safetensors")
    assert figures["max_abs_logits"] <= 1e-4
    assert figures["max_abs_loss"] <= 1e-5
    assert figures["max_abs_features"] <= 1e-4
    assert figures["greedy_token_mismatches"] == 0


def test_cli_converts_and_reports_missing_experts(tmp_path, capsys):
    assert main(["--input_dir", str(ORIGINAL / "original-tiny-dense"), "--output_dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "protein_tokenizer").is_dir()

    broken = tmp_path / "broken"
    shutil.copytree(ORIGINAL / "original-tiny-moe-top1", broken)
    (broken / "global_step100" / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    assert main(["--input_dir", str(broken), "--output_dir", str(tmp_path / "out2")]) == 2
    assert "layer_1_expert_3" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cfg: cfg.update(model_type="llava"), "model_type"),
        (lambda cfg: cfg.pop("protein_token_index"), "protein_token_index"),
        (lambda cfg: cfg.update(protein_feature_select_strategy="default"), "protein_feature_select_strategy"),
        (lambda cfg: cfg.update(moe_config={}), "moe_config"),
    ],
)
def test_bad_original_configs_raise(tmp_path, edit, message):
    folder = tmp_path / "original"
    shutil.copytree(ORIGINAL / "original-tiny-moe-top1", folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        convert(folder, tmp_path / "out")


def test_a_failed_conversion_leaves_the_previous_folder_intact(tmp_path):
    out = tmp_path / "out"
    convert(ORIGINAL / "original-tiny-dense", out)
    before = (out / "model.safetensors").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(ORIGINAL / "original-tiny-dense", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        convert(broken, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_kernel_report_says_whether_the_structure_bias_varies_with_distance(converted, capsys, tmp_path):
    _, model, _ = converted
    report = kernel_report(model)
    assert not report["degenerate"] and report["bias_variation_2_40A"] > 1e-3  # the fixtures' kernels were trained
    untrained = copy.deepcopy(model)
    with torch.no_grad():  # what from_pretrained under transformers 4.39 left in the release: means = widths = 0
        untrained.model.structure_module.gaussian_kernels.means.zero_()
        untrained.model.structure_module.gaussian_kernels.stds.zero_()
    degenerate = kernel_report(untrained)
    assert degenerate["degenerate"] and degenerate["widths_max"] == 0.0
    assert main(["--input_dir", str(ORIGINAL / "original-tiny-dense"), "--output_dir", str(tmp_path / "out")]) == 0
    assert "structure kernels: means_min=" in capsys.readouterr().out
