"""The evaluation harness: what each system sends to `generate` (structure, sequence only, no protein, the sequence
as text to a PureLLM), answers in row order, batched answers equal one-by-one answers, and bad arguments named."""

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_sepit.evaluation_sepit import (
    NO_PROTEIN,
    PURE_LLM,
    SEPIT,
    STRUCTURE_WITHHELD,
    generate_answers,
    is_closed,
)
from modeling_sepit.pure_llm import prepare_pure_llm


@pytest.fixture(scope="module")
def rows(demo_dataset) -> list[dict]:
    """Four held-out questions and one about lysozyme, whose structure the dataset attached."""
    dataset = load_dataset(str(demo_dataset), "instructions")
    lysozyme = next(row for row in dataset["train"] if row["accession"] == "P00698")
    assert lysozyme["coords"] is not None
    return [*dataset["test"].select(range(4)).to_list(), lysozyme]


def recorded_generate(model, monkeypatch, method: str = "generate") -> list[dict]:
    """The inputs of each call of `model.<method>`, tensors copied (`get_protein_features`: the proteins a batch
    encodes)."""
    calls = []
    original = getattr(model, method)

    def recording(**inputs):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return original(**inputs)

    monkeypatch.setattr(model, method, recording)
    return calls


def test_each_system_sends_what_it_names(model_and_processor, rows, monkeypatch) -> None:
    model, processor = model_and_processor
    calls = recorded_generate(model, monkeypatch)
    encoded = recorded_generate(model, monkeypatch, "get_protein_features")
    for system in (SEPIT, STRUCTURE_WITHHELD, NO_PROTEIN):
        answers = generate_answers(model, processor, rows, system, batch_size=8, max_new_tokens=3, progress=False)
        assert len(answers) == len(rows) and all(isinstance(answer, str) for answer in answers)
    (*with_protein, no_protein), (sepit, withheld) = calls, encoded  # no protein: nothing encoded
    assert all("mm_encoder_outputs" in call and "protein_input_ids" not in call for call in with_protein)
    assert sepit["protein_coords_mask"].sum() == sum(rows[-1]["coords_mask"][:64])  # lysozyme, cut at 64 residues
    distinct = len({row["sequence"] for row in rows})
    assert withheld["protein_input_ids"].shape[0] == distinct and "protein_coords" not in withheld
    assert "protein_input_ids" not in no_protein and "mm_encoder_outputs" not in no_protein
    assert not (no_protein["input_ids"] == processor.protein_token_id).any()


def test_batched_answers_come_back_in_row_order_and_equal_one_by_one(model_and_processor, rows) -> None:
    model, processor = model_and_processor
    batched = generate_answers(model, processor, rows, SEPIT, batch_size=3, max_new_tokens=6, progress=False)
    one_by_one = [
        generate_answers(model, processor, [row], SEPIT, batch_size=1, max_new_tokens=6, progress=False)[0]
        for row in rows
    ]
    assert batched == one_by_one


def test_bad_arguments_are_named(model_and_processor, rows) -> None:
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="system must be one of"):
        generate_answers(model, processor, rows, "sepit-large", progress=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        generate_answers(model, processor, rows, SEPIT, batch_size=0, progress=False)


def test_closed_questions_are_the_yes_no_types() -> None:
    assert is_closed("yes_no:go_mf") and is_closed("yes_no:instructprotein_metal_ion_binding")
    assert not is_closed("function") and not is_closed("go_mf")


@pytest.fixture(scope="module")
def pure_llm(tiny_parts):
    """The tiny LLM prepared as a PureLLM that writes 20 residues per protein."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "language_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_parts / "language_model")
    prepare_pure_llm(model, tokenizer, max_protein_length=20)
    return model.eval(), tokenizer


def test_the_pure_llm_reads_the_sequence_as_text_cut_as_it_was_trained(pure_llm, rows, monkeypatch) -> None:
    model, tokenizer = pure_llm
    calls = recorded_generate(model, monkeypatch)
    answers = generate_answers(model, tokenizer, rows, PURE_LLM, batch_size=8, max_new_tokens=3, progress=False)
    assert len(answers) == len(rows) and all(isinstance(answer, str) for answer in answers)
    (call,) = calls
    # text only: no protein tensors, no coordinates, no features
    tensors = {name for name, value in call.items() if isinstance(value, torch.Tensor)}
    assert tensors == {"input_ids", "attention_mask"} and "mm_encoder_outputs" not in call
    prompts = tokenizer.batch_decode(call["input_ids"], skip_special_tokens=False)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["sequence"]))
    for prompt, i in zip(prompts, order, strict=True):
        question = rows[i]["question"].replace("<protein>", f"<bop>{rows[i]['sequence'][:20]}<eop>")
        assert prompt.endswith(f"{question} [/INST]")  # left-padded, SEPIT's prompt
    one_by_one = [
        generate_answers(model, tokenizer, [row], PURE_LLM, batch_size=1, max_new_tokens=3, progress=False)[0]
        for row in rows
    ]
    assert answers == one_by_one


def test_each_system_needs_its_own_model(model_and_processor, pure_llm, rows) -> None:
    (model, processor), (pure_model, tokenizer) = model_and_processor, pure_llm
    with pytest.raises(ValueError, match="processor: 'purellm, sequence as text' is answered by a PureLLM"):
        generate_answers(model, processor, rows, PURE_LLM, progress=False)
    with pytest.raises(ValueError, match="processor: 'sepit' is answered by a SEPIT model and its SepitProcessor"):
        generate_answers(pure_model, tokenizer, rows, SEPIT, progress=False)
