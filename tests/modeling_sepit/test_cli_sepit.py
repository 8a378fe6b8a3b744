"""The trainer scripts' argument checks in `modeling_sepit/cli_sepit.py` that need no training run."""

import warnings

import pytest
import torch
from transformers import TrainingArguments

from modeling_sepit import cli_sepit
from modeling_sepit.cli_sepit import check_training_run

EMULATED = (
    "bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so PyTorch emulates bf16 autocast and training runs "
    "slower than in float32; pass --bf16 false"
)


def training_args(tmp_path, bf16: bool) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=bf16, report_to="none")


@pytest.mark.parametrize(
    ("machine", "avx512_bf16", "amx", "expected"),
    [
        ("x86_64", True, False, True),
        ("AMD64", False, True, True),
        ("x86_64", False, False, False),
        ("aarch64", False, False, None),
    ],
)
def test_cpu_has_bf16_reads_the_instruction_sets_on_x86_only(monkeypatch, machine, avx512_bf16, amx, expected) -> None:
    monkeypatch.setattr(cli_sepit.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cli_sepit.cpu_has_bf16() is expected


@pytest.mark.parametrize(("native", "bf16", "warns"), [(False, True, True), (True, True, False), (False, False, False)])
def test_bf16_training_on_a_cpu_without_bf16_instructions_warns_with_the_fix(
    tmp_path, monkeypatch, native, bf16, warns
) -> None:
    """A recipe's `bf16: true` (the SmolLM2 preset's) on a CPU that would emulate bf16 says so before the run."""
    monkeypatch.setattr(cli_sepit, "cpu_has_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training_run(training_args(tmp_path, bf16), "sft", [], overwrite=False)
    messages = [str(warning.message) for warning in caught if "bf16" in str(warning.message)]
    assert messages == ([EMULATED] if warns else [])
