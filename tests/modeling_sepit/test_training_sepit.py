"""Training pieces: per-module learning rates, freezing from a recipe, activated-parameter counts, loss plots, the
LLM lengths behind length-grouped batches, the PureLLM baseline's collator."""

from types import SimpleNamespace

import matplotlib.figure
import numpy as np
import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_pt_utils import get_length_grouped_indices

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.processing_sepit import DEFAULT_SYSTEM_PROMPT
from modeling_sepit.pure_llm import prepare_pure_llm
from modeling_sepit.training_sepit import (
    SepitSFTTrainer,
    SequenceAsTextCollator,
    expert_load,
    freeze_modules,
    llm_lengths,
    loss_curves,
    mega_batch_steps,
    parameter_counts,
    parameter_groups,
    save_loss_plot,
    take_chat_template_path,
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


def zigzag_history(steps: int = 1000, logging_steps: int = 5, period: int = 50, eval_every: int = 200) -> list[dict]:
    """A `log_history` as a length-grouped run logs it: a decaying trend plus a sawtooth of `period` steps (each
    mega-batch starts on its longest rows), logged every `logging_steps`, with a validation loss now and then."""
    history = []
    for step in range(logging_steps, steps + 1, logging_steps):
        sawtooth = 0.3 * (0.5 - ((step - 1) % period) / period)  # zero mean over a period
        history.append({"loss": trend(step) + sawtooth, "train_runtime": step / 10, "step": step})
        if step % eval_every == 0:
            history.append({"eval_loss": trend(step) + 0.1, "eval_runtime": 1.0, "step": step})
    history.append({"train_runtime": 9.0, "train_loss": 1.5, "step": steps})
    return history


def trend(step: float) -> float:
    return 0.5 + 2.0 * np.exp(-step / 400)


def test_loss_plot_smooths_the_length_grouping_zigzag_and_names_each_series(tmp_path, monkeypatch) -> None:
    history = zigzag_history()
    curves = {curve.label: curve for curve in loss_curves(history, zigzag_period=50)}
    raw = next(curve for label, curve in curves.items() if label.startswith("train loss (raw"))
    smoothed = next(curve for label, curve in curves.items() if label.startswith("train loss (smoothed"))
    assert "50 steps" in smoothed.label and "every 5 steps" in raw.label
    # Zig-zag left: the point-to-point jumps around the trend. The sawtooth cancels in every whole window.
    raw_jumps, smoothed_jumps = (np.diff(curve.values - trend(curve.steps)) for curve in (raw, smoothed))
    assert smoothed_jumps.std() < 0.001 * raw_jumps.std()
    # The smoothed line follows the trend (off by the sampled sawtooth's mean) from half a window in at either end ...
    raw_error, smoothed_error = (np.abs(curve.values - trend(curve.steps)).max() for curve in (raw, smoothed))
    assert raw_error > 0.13 and smoothed_error < 0.1 * raw_error
    assert smoothed.steps[0] - raw.steps[0] <= 25 and raw.steps[-1] - smoothed.steps[-1] <= 25
    # ... and travels the trend's way down, not the raw line's up-and-down path (12 loss units).
    assert np.abs(np.diff(smoothed.values)).sum() < 1.05 * (trend(raw.steps[0]) - trend(raw.steps[-1]))
    assert raw.style["alpha"] < 0.5 and smoothed.style["linewidth"] > raw.style["linewidth"]
    validation = curves["validation loss"]
    assert validation.steps.tolist() == [200, 400, 600, 800, 1000] and validation.style["marker"] == "o"
    assert not any("train_loss" in label for label in curves)  # the run's summary mean is no point of the curve

    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def capture(figure, *args, **kwargs):
        axis = figure.axes[0]
        drawn.update(legend=[text.get_text() for text in axis.get_legend().get_texts()], title=axis.get_title())
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    path = save_loss_plot(history, tmp_path / "loss_curve.png", "stage 1: demo", zigzag_period=50)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes()[:4] == b"\x89PNG"
    assert drawn["legend"] == list(curves)
    assert [label.split(" (")[0] for label in drawn["legend"]] == ["train loss", "train loss", "validation loss"]
    assert "zig-zags every 50 steps" in drawn["title"] and "length-grouped" in drawn["title"]
    save_loss_plot(history, tmp_path / "plain.png", "stage 0")
    assert "zig-zags" not in drawn["title"]  # no length grouping, no note
    # A run shorter than its logging interval logs only its mean: still a point to see.
    save_loss_plot([{"train_loss": 2.5, "train_runtime": 1.0, "step": 2}], tmp_path / "short.png", "stage 0")
    assert drawn["legend"] == ["train loss (mean of the run)"]


def test_mega_batch_steps_is_the_samplers_period() -> None:
    def trainer(rows: int, batch: int = 4, accumulation: int = 1, processes: int = 1, strategy="group_by_length"):
        args = SimpleNamespace(
            train_sampling_strategy=strategy,
            train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            world_size=processes,
        )
        return SimpleNamespace(args=args, train_dataset=[None] * rows)

    assert mega_batch_steps(trainer(10_000)) == 50
    assert mega_batch_steps(trainer(10_000, processes=2)) == 25  # each step takes a batch from each process
    assert mega_batch_steps(trainer(10_000, accumulation=4)) == 50  # a sampler batch is one optimizer step
    assert mega_batch_steps(trainer(170)) == 10  # small datasets: 4 mega-batches at least
    assert mega_batch_steps(trainer(10_000, strategy="random")) is None
    # transformers' sampler: each mega-batch of 50 batches of 4 rows runs longest first.
    lengths = torch.randperm(1000).tolist()
    order = [lengths[i] for i in get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(0))]
    for start in range(0, 1000, 50 * 4):
        chunk = order[start + 1 : start + 200]  # the sampler may swap each chunk's first row for the longest
        assert chunk == sorted(chunk, reverse=True)


@pytest.mark.parametrize("pooling", [1, 4])
def test_llm_lengths_follow_the_real_input_lengths(demo_dataset, tiny_parts, pooling) -> None:
    processor = SepitProcessor.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model", max_protein_length=200, protein_pooling=pooling
    )
    rows = load_dataset(str(demo_dataset), "instructions", split="train").shuffle(seed=0).select(range(24))
    estimated = llm_lengths(rows[:], processor)
    chats = (processor.apply_chat_template(row["messages"], proteins=[row["sequence"]], tokenize=True) for row in rows)
    real = [input_ids.shape[1] for input_ids in chats]
    # What the estimate leaves out is the chat template's fixed tokens (and a merge or two at its seams).
    overhead = [r - e for r, e in zip(real, estimated, strict=True)]
    assert max(overhead) - min(overhead) <= 4 and min(overhead) > 0
    assert len(set(estimated)) > 10  # the lengths differ enough to group


@pytest.fixture(scope="module")
def moe_trainer_parts(tiny_parts, demo_dataset, tmp_path_factory):
    """An upcycled tiny model, its processor and demo rows with the shortest and the longest answer among 40."""
    processor = SepitProcessor.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model", max_protein_length=32
    )
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model"
    )
    model.upcycle_to_moe(num_experts=2)
    rows = load_dataset(str(demo_dataset), "instructions")["train"].select(range(40))
    lengths = [len(row["messages"][-1]["content"]) for row in rows]
    rows = rows.select([lengths.index(min(lengths)), lengths.index(max(lengths)), 2, 3])
    return model, processor, rows, tmp_path_factory.mktemp("moe-trainer")


def trainer_loss(parts, reduction: str) -> tuple[float, float, object, SepitSFTTrainer]:
    from trl import SFTConfig

    model, processor, rows, folder = parts
    collator = processor.get_data_collator(structure_dropout=0.0, seed=0)
    args = SFTConfig(
        output_dir=str(folder), report_to=[], bf16=False, remove_unused_columns=False, max_steps=1,
        dataset_kwargs={"skip_prepare_dataset": True},
    )  # fmt: skip
    trainer = SepitSFTTrainer(
        model=model, args=args, train_dataset=rows, processing_class=processor, data_collator=collator,
        loss_reduction=reduction,
    )  # fmt: skip
    batch = collator(list(rows))
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, dict(batch)))
        logits = model(**batch).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        valid = labels != -100
        if reduction == "token":
            expected = float((nll * valid).sum() / valid.sum())
        else:
            expected = float(((nll * valid).sum(-1) / valid.sum(-1)).mean())
        routed = model(**batch, output_router_logits=True)
    return loss, expected, routed, trainer


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_trainer_loss_reductions_and_the_per_layer_balancing_loss(moe_trainer_parts, reduction):
    loss, expected, routed, trainer = trainer_loss(moe_trainer_parts, reduction)
    # The trainer adds 0.01 x the per-layer balancing loss (TRL's pooled one is off), on the fused LM head's loss.
    assert not trainer.aux_loss_enabled and trainer.sepit_aux_loss_coef == 0.01
    torch.testing.assert_close(
        torch.tensor(loss), torch.tensor(expected + 0.01 * float(routed.aux_loss)), rtol=1e-4, atol=1e-5
    )
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(float(routed.aux_loss), rel=1e-4)


def test_expert_load_counts_each_layers_assignments(moe_trainer_parts):
    model, processor, rows, _ = moe_trainer_parts
    load = expert_load(model, processor.get_data_collator(structure_dropout=0.0), rows, batch_size=3)
    assert len(load) == model.config.text_config.num_hidden_layers and all(len(layer) == 2 for layer in load)
    assert all(sum(layer) == pytest.approx(1.0) for layer in load)
    router = model.model.language_model.layers[0].mlp.gate
    # Layer 0's router collapsed onto expert 1 (its choices replaced before anything else reads them).
    hook = router.register_forward_hook(lambda _m, _a, out: (out[0], out[1], torch.ones_like(out[2])))
    try:
        collapsed = expert_load(model, processor.get_data_collator(structure_dropout=0.0), rows, batch_size=3)
    finally:
        hook.remove()
    assert collapsed[0] == [0.0, 1.0] and collapsed[1] == pytest.approx(load[1])


# --- SequenceAsTextCollator: the PureLLM baseline's batches --------------------------------------------------------

QUESTION = [{"role": "user", "content": "What does <protein> do ?"}, {"role": "assistant", "content": "It binds iron."}]


@pytest.fixture(scope="module")
def pure_tokenizer(tiny_parts):
    """The tiny LLM's tokenizer prepared as a PureLLM's (`<bop>`/`<eop>`, SEPIT's chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "language_model")
    prepare_pure_llm(AutoModelForCausalLM.from_pretrained(tiny_parts / "language_model"), tokenizer, 1022)
    return tokenizer


def answer_of(tokenizer, batch, row: int = 0) -> str:
    return tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100])


def test_sequence_as_text_collator_writes_sepits_prompt_with_the_sequence(pure_tokenizer, tiny_parts) -> None:
    collator = SequenceAsTextCollator(pure_tokenizer, max_protein_length=8)
    short = {"messages": [{**QUESTION[0]}, {"role": "assistant", "content": "No."}], "sequence": "MKT"}
    batch = collator([{"messages": QUESTION, "sequence": "MKTAYIAKQRQISF"}, short])
    expected = f"[INST] <<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\nWhat does <bop>MKTAYIAK<eop> do ? [/INST]"
    assert pure_tokenizer.decode(batch["input_ids"][0]) == expected + " It binds iron. </s>"  # cut at 8 residues
    assert answer_of(pure_tokenizer, batch) == " It binds iron. </s>"  # labels: the answer and its eos only
    assert answer_of(pure_tokenizer, batch, 1) == " No. </s>"
    padded = batch["attention_mask"][1] == 0  # right-padded, never labelled
    assert padded.any() and not padded[: padded.nonzero()[0]].any() and (batch["labels"][1][padded] == -100).all()
    # The same tokens as SEPIT's prompt with its `<protein>` written as text.
    processor = SepitProcessor.from_pretrained_parts(tiny_parts / "protein_model", tiny_parts / "language_model")
    sepit = processor.apply_chat_template(QUESTION).replace("<protein>", "<bop>MKTAYIAK<eop>")
    assert batch["input_ids"][0].tolist() == pure_tokenizer(sepit)["input_ids"]


def test_sequence_as_text_collator_cuts_the_sequence_so_that_the_answer_fits(pure_tokenizer, demo_dataset) -> None:
    row = next(
        row
        for row in load_dataset(str(demo_dataset), "instructions", split="train")
        if len(row["sequence"]) > 400 and 150 < len(row["answer"]) < 400
    )
    full = SequenceAsTextCollator(pure_tokenizer, max_protein_length=300, max_length=None)([row])
    length = full["input_ids"].shape[1]
    fitted = SequenceAsTextCollator(pure_tokenizer, max_protein_length=300, max_length=length - 40)([row])
    assert length - 40 - 3 <= fitted["input_ids"].shape[1] <= length - 40
    assert answer_of(pure_tokenizer, fitted) == answer_of(pure_tokenizer, full)  # the answer whole
    written = pure_tokenizer.decode(fitted["input_ids"][0]).split("<bop>")[1].split("<eop>")[0]
    assert row["sequence"].startswith(written) and 250 < len(written) < 300
    # An answer that cannot fit even without the protein loses the protein, then its tail at max_length.
    without = SequenceAsTextCollator(pure_tokenizer, max_protein_length=1, max_length=None)([row])["input_ids"].shape[1]
    with pytest.warns(UserWarning, match="even without its protein sequence: its answer is cut there"):
        cut = SequenceAsTextCollator(pure_tokenizer, max_protein_length=300, max_length=without - 10)([row])
    assert cut["input_ids"].shape[1] == without - 10 and "<bop><eop>" in pure_tokenizer.decode(cut["input_ids"][0])
    assert answer_of(pure_tokenizer, full).startswith(answer_of(pure_tokenizer, cut))


def test_sequence_as_text_collator_lengths_and_refusals(pure_tokenizer, tiny_parts, demo_dataset) -> None:
    collator = SequenceAsTextCollator(pure_tokenizer, max_protein_length=64)
    rows = load_dataset(str(demo_dataset), "instructions", split="train").select(range(6))
    assert collator.lengths(rows[:]) == [collator([row])["input_ids"].shape[1] for row in rows]
    with pytest.raises(ValueError, match=r"examples\[0\].messages: 0 `<protein>` tags for 1 protein sequences"):
        collator([{"messages": [{"role": "user", "content": "Why ?"}, QUESTION[1]], "sequence": "MKT"}])
    with pytest.raises(ValueError, match=r"examples\[0\]: no assistant reply to train on"):
        collator([{"messages": QUESTION[:1], "sequence": "MKT"}])
    with pytest.raises(ValueError, match="no <bop>/<eop> tokens; prepare it with prepare_pure_llm"):
        SequenceAsTextCollator(AutoTokenizer.from_pretrained(tiny_parts / "language_model"))


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}"
    "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def chatml_tokenizer(tiny_parts, tmp_path):
    """(folder, tokenizer) of a ChatML tokenizer: the tiny parts' BPE with <|im_start|>/<|im_end|> as special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "language_model")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path / "chatml")
    return tmp_path / "chatml", tokenizer


def test_chat_template_path_takes_a_tokenizers_template_and_clears_the_option(chatml_tokenizer) -> None:
    folder, tokenizer = chatml_tokenizer
    args = SimpleNamespace(chat_template_path=str(folder))
    assert take_chat_template_path(args, tokenizer) == CHATML
    assert args.chat_template_path is None  # SFTTrainer would otherwise clone tokens into the processor
    assert take_chat_template_path(args, tokenizer) is None


def test_chat_template_path_reads_a_jinja_file(tmp_path, chatml_tokenizer) -> None:
    (tmp_path / "template.jinja").write_text(CHATML, encoding="utf-8")
    args = SimpleNamespace(chat_template_path=str(tmp_path / "template.jinja"))
    assert take_chat_template_path(args, chatml_tokenizer[1]) == CHATML


def test_chat_template_path_refuses_what_the_llms_tokenizer_cannot_write(
    tiny_parts, tmp_path, chatml_tokenizer
) -> None:
    folder, _ = chatml_tokenizer
    plain = AutoTokenizer.from_pretrained(tiny_parts / "language_model")  # no <|im_start|>, no chat template
    with pytest.raises(ValueError, match=r"chat_template_path: .*writes \['<\|im_end\|>', '<\|im_start\|>'\]"):
        take_chat_template_path(SimpleNamespace(chat_template_path=str(folder)), plain)
    plain.save_pretrained(tmp_path / "no-template")
    with pytest.raises(ValueError, match="chat_template_path: .* has no single chat template"):
        take_chat_template_path(SimpleNamespace(chat_template_path=str(tmp_path / "no-template")), plain)
    with pytest.raises(ValueError, match="chat_template_path: .* is neither a .jinja/.j2 file nor a tokenizer"):
        take_chat_template_path(SimpleNamespace(chat_template_path=str(tmp_path / "missing")), plain)
