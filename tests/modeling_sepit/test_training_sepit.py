"""Training pieces: per-module learning rates, freezing from a recipe, activated-parameter counts, loss plots, the
LLM lengths behind length-grouped batches."""

import pytest
from datasets import load_dataset

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.training_sepit import (
    freeze_modules,
    llm_lengths,
    parameter_counts,
    parameter_groups,
    save_loss_plot,
)
from tests.conftest import tiny_config


@pytest.fixture
def model() -> SepitForConditionalGeneration:
    return SepitForConditionalGeneration(tiny_config())


def _module_lrs(model, groups) -> dict[str, set[float]]:
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    found: dict[str, set[float]] = {}
    for name, parameter in model.named_parameters():
        part = name.split(".")[1] if name.startswith("model.") else "lm_head"
        found.setdefault(part, set()).add(lr_of[id(parameter)])
    return found


def test_projector_at_the_base_rate_encoder_and_llm_at_their_fraction(model) -> None:
    decay = {name for name, p in model.named_parameters() if p.ndim >= 2}
    groups = parameter_groups(model, 1e-3, 0.1, decay, encoder_lr_scale=0.1, language_model_lr_scale=0.5)
    lrs = _module_lrs(model, groups)
    assert lrs["multi_modal_projector"] == {1e-3}
    assert lrs["protein_model"] == lrs["structure_module"] == {1e-3 * 0.1}
    assert lrs["language_model"] == lrs["lm_head"] == {5e-4}
    weight_decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    assert all(weight_decay[id(p)] == (0.1 if n in decay else 0.0) for n, p in model.named_parameters())


def test_frozen_parts_leave_the_optimizer(model) -> None:
    freeze_modules(model, ["protein_model", "structure_module"])
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad and "." in name}
    assert "protein_model" not in trainable and "structure_module" not in trainable
    groups = parameter_groups(model, 1e-3, 0.0, set())
    assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="freeze: unknown modules \\['encoder'\\]"):
        freeze_modules(model, ["encoder"])


def test_upcycled_top1_activates_what_the_dense_model_had(model) -> None:
    dense = parameter_counts(model)
    assert dense["activated"] == dense["total"] and dense["router"] == 0
    top1 = parameter_counts(model.upcycle_to_moe(num_experts=4, num_experts_per_tok=1))
    assert (
        top1["activated"] == dense["total"]
        and top1["router"] > 0
        and top1["total"] > top1["activated"] + top1["router"]
    )
    top2 = parameter_counts(SepitForConditionalGeneration(tiny_config()).upcycle_to_moe(4, 2))
    assert top2["activated"] > dense["total"]


def test_loss_plot_written_atomically(tmp_path) -> None:
    history = [{"loss": 3.0 - 0.1 * step, "contrastive_loss": 1.0, "step": step} for step in range(1, 11)]
    path = save_loss_plot(history, tmp_path / "loss_curve.png", "stage")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(tmp_path.iterdir()) == [path]
    assert save_loss_plot([{"learning_rate": 1.0, "step": 1}], tmp_path / "none.png", "stage") is None


@pytest.mark.parametrize("pooling", [1, 4])
def test_llm_lengths_follow_the_real_input_lengths(demo_dataset, tiny_parts, pooling) -> None:
    processor = SepitProcessor.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model", max_protein_length=200, protein_pooling=pooling
    )
    rows = load_dataset(str(demo_dataset), "instructions", split="train").shuffle(seed=0).select(range(24))
    estimated = llm_lengths(rows[:], processor)
    real = [
        processor.apply_chat_template(row["messages"], proteins=[row["sequence"]])["input_ids"].shape[1] for row in rows
    ]
    # What the estimate leaves out is the chat template's fixed tokens (and a merge or two at its seams).
    overhead = [r - e for r, e in zip(real, estimated, strict=True)]
    assert max(overhead) - min(overhead) <= 4 and min(overhead) > 0
    assert len(set(estimated)) > 10  # the lengths differ enough to group
