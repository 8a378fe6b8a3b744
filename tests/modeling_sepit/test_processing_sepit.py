"""SepitProcessor and SepitDataCollator on real proteins: expansion, padding, labels, truncation, saving, errors."""

import json
import math
from dataclasses import dataclass

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
        chat,
        proteins=[real_proteins[2][0]],
        add_generation_prompt=True,
        chat_template=CHATML,
        tokenize=True,
        return_dict=True,
    )
    assert (out["input_ids"] == processor.protein_token_id).sum() == len(real_proteins[2][0]) + 2
    chatml = SepitProcessor(
        tokenizer=processor.tokenizer, protein_tokenizer=processor.protein_tokenizer, chat_template=CHATML
    )
    with pytest.raises(ValueError, match="generation"):
        chatml.get_data_collator()


def test_each_protein_tag_expands_to_its_feature_positions(processor, real_proteins):
    (lysozyme, ca), (headpiece, _) = real_proteins[0], real_proteins[1]
    out = processor(
        text=["What is <protein> ?", "Compare <protein> with <protein> ."],
        proteins=[[{"sequence": lysozyme, "coords": ca.numpy()}], [headpiece, lysozyme]],
        padding=True,
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
    texts = ["<protein> and <protein>", "<protein>"]
    nested = processor(text=texts, proteins=[sequences[:2], sequences[2:]], padding=True)
    flat = processor(text=texts, proteins=sequences, padding=True)
    for key in nested:
        assert torch.equal(nested[key], flat[key])


GENERATION = {"add_generation_prompt": True, "tokenize": True, "return_dict": True}


def test_generation_prompts_pad_as_asked_and_the_collator_labels_the_assistant_turn(processor, real_proteins):
    sequence = real_proteins[2][0]
    chat = [{"role": "user", "content": "What is the function of <bop><protein><eop> ?"}]
    prompt = processor.apply_chat_template([chat, chat[:1]], proteins=[[sequence], [sequence]], **GENERATION)
    assert "labels" not in prompt and processor.tokenizer.padding_side == "right"
    answer = "It binds ubiquitin and marks proteins for degradation ."
    train = processor.get_data_collator()(
        [{"messages": chat + [{"role": "assistant", "content": answer}], "proteins": [sequence]}]
    )
    labelled = train["labels"][train["labels"] != -100]
    expected = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert labelled.tolist() == expected
    short = processor.apply_chat_template(
        [chat, chat],
        proteins=[[sequence], [real_proteins[1][0]]],
        processor_kwargs={"padding": True, "padding_side": "left"},
        **GENERATION,
    )
    assert short["attention_mask"][0, 0] == 0 and short["attention_mask"][0, -1] == 1  # left padding
    with pytest.raises(ValueError, match="padding=True"):  # the tokenizer's own refusal of ragged tensors
        processor.apply_chat_template([chat, chat], proteins=[[sequence], [real_proteins[1][0]]], **GENERATION)


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
    before = processor.to_dict()
    processor.save_pretrained(tmp_path)
    assert processor.to_dict() == before  # saving leaves the processor as it was (no `auto_map` set on it)
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_sepit.SepitProcessor"
    }
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
    pooled = pooling_processor(processor, pooling)(
        text=POOLING_TEXTS, proteins=proteins, padding=True, padding_side="right"
    )
    tokens = [math.ceil((len(lysozyme) + 2) / pooling), math.ceil((len(headpiece) + 2) / pooling)]
    placeholders = (pooled["input_ids"] == processor.protein_token_id).sum(-1).tolist()
    assert placeholders == [tokens[0], tokens[1] + tokens[0]]
    lengths = pooled_lengths(processor, [[lysozyme], [headpiece, lysozyme]], pooling)
    assert pooled["attention_mask"].sum(-1).tolist() == lengths
    full = processor(text=POOLING_TEXTS, proteins=proteins, padding=True, padding_side="right")
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
    pooled = pooling_processor(processor, 2)(text=POOLING_TEXTS, proteins=sequences, padding=True)
    full = processor(text=POOLING_TEXTS, proteins=sequences, padding=True)
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


TEXTS = ["What is it ?", "Is this protein an enzyme that binds zinc in the nucleus ?", "Where ?"]
TOKENIZER_SETTINGS = [
    {},
    {"padding": True},
    {"padding": "longest", "padding_side": "left"},
    {"padding": "max_length", "max_length": 24},
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "truncation": True, "max_length": 6},
    {"padding": "max_length", "truncation": True, "max_length": 10, "padding_side": "left"},
    {"padding": True, "add_special_tokens": False},
    {"padding": True, "return_attention_mask": False},
]


@pytest.mark.parametrize("settings", TOKENIZER_SETTINGS)
@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_text_only_inputs_equal_the_llm_tokenizers(processor, settings, return_tensors):
    if return_tensors is not None and not settings.get("padding"):
        texts = TEXTS[:1]  # unpadded rows of different lengths cannot be stacked (the tokenizer refuses too)
    else:
        texts = TEXTS
    ours = processor(text=texts, return_tensors=return_tensors, **settings)
    theirs = processor.tokenizer(texts, return_tensors=return_tensors, **settings)
    assert set(ours) == set(theirs)
    for key in theirs:
        if return_tensors is None:
            assert ours[key] == theirs[key], key
        else:
            assert np.array_equal(np.asarray(ours[key]), np.asarray(theirs[key])), key


@pytest.mark.parametrize("settings", TOKENIZER_SETTINGS[1:5] + TOKENIZER_SETTINGS[7:])
def test_text_around_proteins_is_tokenised_as_the_llm_tokenizer_does(processor, real_proteins, settings):
    """Each `<protein>` becomes its run of placeholders and everything else is the tokenizer's own output for the
    expanded text, padding and special tokens included."""
    sequences = [real_proteins[2][0], real_proteins[1][0], real_proteins[2][0]]
    texts = [f"{text} <protein>" for text in TEXTS]
    if settings.get("padding") == "max_length":
        settings = {**settings, "max_length": 80}
    ours = processor(text=texts, proteins=sequences, **settings)
    expanded = [
        text.replace("<protein>", "<protein>" * (len(sequence) + 2))
        for text, sequence in zip(texts, sequences, strict=True)
    ]
    theirs = processor.tokenizer(expanded, return_tensors="pt", **settings)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    if "attention_mask" in ours:
        pad = ours["input_ids"] == processor.tokenizer.pad_token_id
        assert not ours["attention_mask"][pad & (ours["input_ids"] != processor.tokenizer.eos_token_id)].any()


def test_truncation_keeps_whole_proteins_or_refuses(processor, real_proteins):
    sequence = real_proteins[2][0]  # 26 residues: 28 placeholders
    text = "<protein> What is the function of this protein in the cell ?"
    full = processor(text=text, proteins=sequence)
    kept = processor(text=text, proteins=sequence, truncation=True, max_length=31)
    assert kept["input_ids"].shape[1] == 31 and torch.equal(kept["input_ids"][0], full["input_ids"][0, :31])
    with pytest.raises(ValueError, match=r"keeps 20 of its 28 `<protein>` placeholders"):
        processor(text=text, proteins=sequence, truncation=True, max_length=21)
    with pytest.raises(ValueError, match="truncation_side='left'"):
        processor.tokenizer.truncation_side = "left"
        try:
            processor(text=text, proteins=sequence, truncation=True, max_length=31)
        finally:
            processor.tokenizer.truncation_side = "right"


def test_typed_content_with_protein_items_equals_tags_with_proteins(processor, real_proteins):
    sequence, ca = real_proteins[1]
    typed = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is"},
                {"type": "protein", "sequence": sequence, "coords": ca.numpy(), "structure": None},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    tagged = [{"role": "user", "content": "What is <protein> ?"}]
    assert processor.apply_chat_template(typed) == processor.apply_chat_template(tagged)
    ours = processor.apply_chat_template(typed, **GENERATION)
    theirs = processor.apply_chat_template(
        tagged, proteins=[{"sequence": sequence, "coords": ca.numpy()}], **GENERATION
    )
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is a kinase ?"}]}]  # TRL's form
    assert processor.apply_chat_template(text_only) == processor.apply_chat_template(
        [{"role": "user", "content": "What is a kinase ?"}]
    )
    with pytest.raises(ValueError, match="both as protein items"):
        processor.apply_chat_template(typed, proteins=[sequence], **GENERATION)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "User", "content": "What is <protein> ?"}], "role='User' is not a chat role"),
        ([{"role": "bot", "content": "Hello"}], "role='bot'"),
        (
            [
                {"role": "user", "content": "What is it ?"},
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Really ?"},
            ],
            "a system message can only come first",
        ),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
        ([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], "type 'image'"),
        ([{"role": "user", "content": ""}], "non-empty for a user"),
        ([], "non-empty list"),
    ],
)
def test_messages_the_template_cannot_place_are_errors(processor, messages, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(messages)


def test_chat_template_arguments_behave_as_in_transformers(processor):
    chat = [{"role": "user", "content": "What is a kinase ?"}, {"role": "assistant", "content": "An enzyme that"}]
    continued = processor.apply_chat_template(chat, continue_final_message=True)
    assert continued.endswith("An enzyme that") and processor.tokenizer.eos_token not in continued
    assert "Be brief." in processor.apply_chat_template(chat[:1], default_system="Be brief.")
    template = "{% if add_system_prompt %}SYSTEM {% endif %}{{ messages[0]['content'] }}"
    assert processor.apply_chat_template(chat[:1], chat_template=template, add_system_prompt=True).startswith("SYSTEM")
    masks = processor.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    answer = masks["input_ids"][0][masks["assistant_masks"][0].bool()]
    assert answer[-1] == processor.tokenizer.eos_token_id and processor.decode(answer).endswith("enzyme that </s>")
    ids = processor.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True)
    assert torch.equal(torch.as_tensor(ids), processor(text=processor.apply_chat_template(chat[:1]))["input_ids"])


def test_collator_refuses_examples_with_nothing_to_learn(processor):
    collator = processor.get_data_collator(structure_dropout=0.0)
    with pytest.raises(ValueError, match=r"examples\[1\]: no assistant reply"):
        collator(
            [
                {"messages": [{"role": "user", "content": "Q <protein>"}, {"role": "assistant", "content": "Yes"}]}
                | {"proteins": ["MKT"]},
                {"messages": [{"role": "user", "content": "Q <protein>"}], "proteins": ["MKT"]},
            ]
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"images": ["x.png"]}, "images: SEPIT reads proteins"),
        ({"return_tensors": "tf"}, "return_tensors='tf'"),
        ({"colour": "red"}, r"\['colour'\]: not arguments of SepitProcessor"),
        ({"text_pair": "second"}, r"\['text_pair'\]: not supported"),
        ({"return_overflowing_tokens": True}, "return_overflowing_tokens"),
    ],
)
def test_arguments_the_processor_cannot_honour_are_refused(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(text="What is <protein> ?", proteins="MKTAYIAK", **kwargs)


TYPED_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}"
)


def test_templates_written_for_typed_contents_get_typed_contents(processor, real_proteins):
    """A template that reads items (transformers' message format) gets lists, each protein item as a text item
    holding `<protein>`; the default template (strings only) gets the items joined."""
    sequence = real_proteins[2][0]
    chat = [{"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": "What?"}]}]
    assert processor.apply_chat_template(chat, chat_template=TYPED_TEMPLATE) == "user: <protein>What?"
    out = processor.apply_chat_template(chat, chat_template=TYPED_TEMPLATE, tokenize=True, return_dict=True)
    assert (out["input_ids"] == processor.protein_token_id).sum() == len(sequence) + 2


def test_message_objects_are_messages(processor):
    @dataclass
    class Message:
        role: str
        content: str

    objects = [Message("user", "What is a kinase ?")]
    assert processor.apply_chat_template(objects) == processor.apply_chat_template(
        [{"role": "user", "content": "What is a kinase ?"}]
    )


def test_structure_dropout_is_drawn_anew_each_epoch(processor, real_proteins):
    sequence, ca = real_proteins[2]
    examples = [
        {
            "messages": [
                {"role": "user", "content": f"Question {index} about <protein> ."},
                {"role": "assistant", "content": "A small protein ."},
            ],
            "proteins": [{"sequence": sequence, "coords": ca.numpy()}],
        }
        for index in range(300)
    ]
    collator = processor.get_data_collator(structure_dropout=0.15, seed=0)

    def dropped(epoch: int) -> np.ndarray:
        collator.set_epoch(epoch)
        batches = [collator([example]) for example in examples]
        return np.array(
            [not ("protein_coords_mask" in batch and batch["protein_coords_mask"].any()) for batch in batches]
        )

    epochs = [dropped(epoch) for epoch in range(4)]
    assert all(0.08 <= drops.mean() <= 0.22 for drops in epochs)
    never = np.logical_and.reduce(epochs)  # without coordinates in every epoch: about 0.15 ** 4
    assert never.mean() < 0.02 and not all((drops == epochs[0]).all() for drops in epochs[1:])
    assert (dropped(2) == epochs[2]).all()  # the same epoch draws the same drops (what a resumed run relies on)
