"""SepitProcessor and SepitDataCollator on real proteins: expansion, padding, labels, truncation, saving, errors."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.convert_original_sepit import convert
from tests.conftest import ORIGINAL, STRUCTURES, tiny_config


@pytest.fixture(scope="module")
def processor(protein_tokenizer) -> SepitProcessor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ORIGINAL / "original-tiny-dense" / "text_tokenizer")
    return SepitProcessor(tokenizer=tokenizer, protein_tokenizer=protein_tokenizer)


def test_default_template_reproduces_the_original_prompts(processor):
    expected = json.loads((ORIGINAL / "original-tiny-dense" / "expected_outputs.json").read_text())
    questions = json.loads((ORIGINAL / "cases.json").read_text())["questions"]
    for batch in expected.values():
        for index, prompt in zip(batch["question_index"], batch["gen_prompts"], strict=True):
            chat = [{"role": "user", "content": questions[index]}]
            assert processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == prompt


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_llm_tokenizers_own_chat_template_can_be_used(processor, real_proteins):
    chat = [{"role": "user", "content": "What is <protein> ?"}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, chat_template=CHATML)
    assert text == "<|im_start|>user\nWhat is <protein> ?<|im_end|>\n<|im_start|>assistant\n"
    out = processor.apply_chat_template(
        chat, proteins=[real_proteins[2][0]], add_generation_prompt=True, chat_template=CHATML
    )
    assert (out["input_ids"] == processor.protein_token_id).sum() == len(real_proteins[2][0]) + 2
    with pytest.raises(ValueError, match="generation"):
        processor.apply_chat_template(
            chat + [{"role": "assistant", "content": "x"}], proteins=["MKT"], chat_template=CHATML
        )


def test_each_protein_tag_expands_to_its_feature_positions(processor, real_proteins):
    (lysozyme, ca), (headpiece, _) = real_proteins[0], real_proteins[1]
    out = processor(
        text=["What is <protein> ?", "Compare <protein> with <protein> ."],
        proteins=[[{"sequence": lysozyme, "coords": ca.numpy()}], [headpiece, lysozyme]],
        padding_side="right",
    )
    placeholders = (out["input_ids"] == processor.protein_token_id).sum(-1).tolist()
    assert placeholders == [len(lysozyme) + 2, len(headpiece) + 2 + len(lysozyme) + 2]
    assert out["protein_input_ids"].shape == (3, len(lysozyme) + 2)
    assert out["protein_coords"].shape == (3, len(lysozyme) + 2, 3)
    assert out["protein_coords_mask"][0].sum() == len(lysozyme) and not out["protein_coords_mask"][1:].any()
    torch.testing.assert_close(out["protein_coords"][0, 1:-1], ca)
    assert out["attention_mask"][0, -1] == 0 and out["attention_mask"][1, -1] == 1  # right padding


def test_flat_protein_list_is_consumed_in_tag_order(processor, real_proteins):
    sequences = [sequence for sequence, _ in real_proteins]
    nested = processor(text=["<protein> and <protein>", "<protein>"], proteins=[sequences[:2], sequences[2:]])
    flat = processor(text=["<protein> and <protein>", "<protein>"], proteins=sequences)
    for key in nested:
        assert torch.equal(nested[key], flat[key])


def test_generation_prompt_pads_left_and_training_labels_cover_the_assistant_turn(processor, real_proteins):
    sequence = real_proteins[2][0]
    chat = [{"role": "user", "content": "What is the function of <bop><protein><eop> ?"}]
    prompt = processor.apply_chat_template(
        [chat, chat[:1]], proteins=[[sequence], [sequence]], add_generation_prompt=True
    )
    assert "labels" not in prompt and processor.tokenizer.padding_side == "right"
    answer = "It binds ubiquitin and marks proteins for degradation ."
    train = processor.apply_chat_template(chat + [{"role": "assistant", "content": answer}], proteins=[sequence])
    labelled = train["labels"][train["labels"] != -100]
    expected = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert labelled.tolist() == expected
    short = processor.apply_chat_template(
        [chat, chat], proteins=[[sequence], [real_proteins[1][0]]], add_generation_prompt=True
    )
    assert short["attention_mask"][0, 0] == 0 and short["attention_mask"][0, -1] == 1  # left padding


def test_structure_file_and_alignment_to_the_full_sequence(processor):
    # 1LCD resolves residues 1-51 of the lac repressor; the rest of this 60-residue stretch has no coordinates.
    structure_only = processor(text="<protein>", proteins=str(STRUCTURES / "biopython__1LCD.pdb"))
    sequence = processor.protein_tokenizer.decode(structure_only["protein_input_ids"][0, 1:-1]).replace(" ", "")
    longer = sequence + "GGSGGSGGS"
    aligned = processor(
        text="<protein>", proteins={"structure": STRUCTURES / "biopython__1LCD.pdb", "sequence": longer}
    )
    mask = aligned["protein_coords_mask"][0]
    assert mask.sum() == len(sequence) and not mask[len(sequence) + 1 :].any()


def test_long_proteins_are_truncated_with_sequence_and_coordinates(processor, real_proteins, caplog):
    sequence, ca = real_proteins[0]
    short = SepitProcessor(
        tokenizer=processor.tokenizer, protein_tokenizer=processor.protein_tokenizer, max_protein_length=50
    )
    out = short(text="<protein>", proteins={"sequence": sequence, "coords": ca.numpy()})
    assert out["protein_input_ids"].shape[1] == 52 and (out["input_ids"] == short.protein_token_id).sum() == 52
    torch.testing.assert_close(out["protein_coords"][0, 1:51], ca[:50])
    assert "truncated" in caplog.text


def test_save_and_load_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "protein_tokenizer").is_dir() and (tmp_path / "chat_template.jinja").is_file()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SepitProcessor) and loaded.chat_template == processor.chat_template
    assert loaded.protein_token_id == processor.protein_token_id
    text = "What is <protein> ?"
    assert torch.equal(
        loaded(text=text, proteins="MKTAYIAK")["input_ids"], processor(text=text, proteins="MKTAYIAK")["input_ids"]
    )


def test_converted_checkpoint_gets_a_compat_processor(tmp_path):
    convert(ORIGINAL / "original-tiny-dense", tmp_path, protein_padding_length=48)
    processor = AutoProcessor.from_pretrained(tmp_path)
    out = processor(text="<protein>", proteins="GSHMKELIKKLLEEAG")
    assert out["protein_input_ids"].shape == (1, 48) and (out["input_ids"] == 63).sum() == 48


def test_collator_drops_structure_at_the_given_rate(processor, real_proteins):
    sequence, ca = real_proteins[2]

    def example(index: int) -> dict:
        return {
            "messages": [
                {"role": "user", "content": f"Question {index} about <protein> ."},
                {"role": "assistant", "content": "A small globular protein ."},
            ],
            "proteins": [{"sequence": sequence, "coords": ca.numpy()}],
        }

    def kept(collator: SepitDataCollator, index: int) -> bool:
        batch = collator([example(index)])
        return bool("protein_coords_mask" in batch and batch["protein_coords_mask"].any())

    collator = SepitDataCollator(processor, structure_dropout=0.15, seed=0)
    decisions = [kept(collator, index) for index in range(400)]
    assert 0.10 <= 1 - np.mean(decisions) <= 0.20
    # Decided by (seed, example) alone: the same again, whatever came before (what a resumed run relies on) ...
    assert [kept(collator, index) for index in reversed(range(400))] == decisions[::-1]
    # ... and another seed drops other examples.
    assert [kept(SepitDataCollator(processor, 0.15, seed=1), index) for index in range(400)] != decisions
    assert (collator([example(0)])["labels"] != -100).any()
    assert SepitDataCollator(processor, structure_dropout=0.0)([example(0)])["protein_coords_mask"].any()


@pytest.mark.parametrize(
    "text, proteins, message",
    [
        ("What is <protein> ?", "mktayiak", "invalid amino-acid letters"),
        ("What is <protein> ?", "MKT4YIAK", "invalid amino-acid letters"),
        ("What is <protein> ?", "", "empty"),
        ("What is <protein> ?", {"sequence": "MKTAYIAK", "coords": np.zeros((8, 2))}, "(L, 3)"),
        ("What is <protein> ?", {"sequence": "MKTAYIAK", "coords": np.zeros((7, 3))}, "(8, 3)"),
        (
            "What is <protein> ?",
            {"sequence": "MKTAYIAK", "coords": np.full((8, 3), np.nan), "coords_mask": np.ones(8, bool)},
            "NaN/inf",
        ),
        (
            "What is <protein> ?",
            {"sequence": "MKTAYIAK", "coords": np.full((8, 3), np.inf), "coords_mask": np.ones(8, bool)},
            "NaN/inf",
        ),
        (
            "What is <protein> ?",
            {"sequence": "MKTAYIAK", "coords_mask": np.ones(8, bool)},
            "coords_mask given without coords",
        ),
        ("<protein> and <protein>", "MKTAYIAK", "2 `<protein>` tags but 1 proteins"),
        ("", "MKTAYIAK", "empty question"),
        ("What is <protein> ?", str(STRUCTURES / "missing.pdb"), "missing.pdb"),
        ("What is <protein> ?", {"structure": STRUCTURES / "biopython__2BEG.cif", "chain": "Z"}, "Z"),
        ("What is <protein> ?", 42, "cannot read a protein"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(processor, text, proteins, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        processor(text=text, proteins=proteins)


def pooling_processor(processor: SepitProcessor, pooling: int) -> SepitProcessor:
    return SepitProcessor(
        tokenizer=processor.tokenizer, protein_tokenizer=processor.protein_tokenizer, protein_pooling=pooling
    )


POOLING_TEXTS = ["What is <protein> ?", "Compare <protein> with <protein> ."]


def pooled_lengths(processor: SepitProcessor, proteins: list[list[str]], pooling: int) -> list[int]:
    """Expected row lengths, counted independently: text tokens (`<protein>` is one token) + ceil(n / k) per protein
    of n feature positions (residues, `<cls>`, `<eos>`)."""
    rows = processor.tokenizer(POOLING_TEXTS)["input_ids"]
    return [
        len(ids) - len(group) + sum(math.ceil((len(sequence) + 2) / pooling) for sequence in group)
        for ids, group in zip(rows, proteins, strict=True)
    ]


@pytest.mark.parametrize("pooling", [2, 3])
def test_pooling_expands_each_tag_to_ceil_n_over_k(processor, real_proteins, pooling):
    (lysozyme, ca), (headpiece, _) = real_proteins[0], real_proteins[1]
    proteins = [[{"sequence": lysozyme, "coords": ca.numpy()}], [headpiece, lysozyme]]
    pooled = pooling_processor(processor, pooling)(text=POOLING_TEXTS, proteins=proteins, padding_side="right")
    tokens = [math.ceil((len(lysozyme) + 2) / pooling), math.ceil((len(headpiece) + 2) / pooling)]
    placeholders = (pooled["input_ids"] == processor.protein_token_id).sum(-1).tolist()
    assert placeholders == [tokens[0], tokens[1] + tokens[0]]
    lengths = pooled_lengths(processor, [[lysozyme], [headpiece, lysozyme]], pooling)
    assert pooled["attention_mask"].sum(-1).tolist() == lengths
    full = processor(text=POOLING_TEXTS, proteins=proteins, padding_side="right")
    for name in ("protein_input_ids", "protein_attention_mask", "protein_coords", "protein_coords_mask"):
        assert torch.equal(pooled[name], full[name])  # the model pools: the protein tensors are unchanged


def test_a_pooled_model_takes_pooled_inputs_and_rejects_mismatched_ones(processor, real_proteins):
    text_config = tiny_config().text_config.to_dict() | {"vocab_size": len(processor.tokenizer), "pad_token_id": 2}

    def model_with(pooling: int) -> SepitForConditionalGeneration:
        config = tiny_config(
            text_config=text_config, protein_token_id=processor.protein_token_id, protein_pooling=pooling
        )
        return SepitForConditionalGeneration(config).eval()

    sequences = [[real_proteins[0][0]], [real_proteins[1][0], real_proteins[2][0]]]
    pooled = pooling_processor(processor, 2)(text=POOLING_TEXTS, proteins=sequences)
    full = processor(text=POOLING_TEXTS, proteins=sequences)
    model = model_with(2)
    with torch.no_grad():
        logits = model(**pooled).logits
    lengths = pooled_lengths(processor, sequences, 2)
    assert logits.shape[1] == max(lengths) and pooled["attention_mask"].sum(-1).tolist() == lengths
    assert max(lengths) < full["input_ids"].shape[1]
    mismatch = r"`input_ids` hold \d+ `<protein>` tokens .* protein_pooling={}"
    with pytest.raises(ValueError, match=mismatch.format(2)):
        model(**full)
    with pytest.raises(ValueError, match=mismatch.format(1)):
        model_with(1)(**pooled)


def test_protein_pooling_survives_save_and_load(processor, tmp_path):
    pooling_processor(processor, 3).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["protein_pooling"] == 3
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SepitProcessor) and loaded.protein_pooling == 3
    assert (loaded(text="<protein>", proteins="MKTAYIAK")["input_ids"] == loaded.protein_token_id).sum() == 4


@pytest.mark.parametrize("overrides", [{"protein_pooling": 0}, {"protein_pooling": 2, "original_compat": True}])
def test_bad_protein_pooling_is_rejected(processor, overrides):
    with pytest.raises(ValueError, match="protein_pooling"):
        SepitProcessor(tokenizer=processor.tokenizer, protein_tokenizer=processor.protein_tokenizer, **overrides)
