"""The PureLLM baseline's pieces: sequences written into the messages as text, SEPIT's prompt tokens with a bos token
where the tokenizer adds one, a plain LLM made a PureLLM (tokens, embeddings, recorded cut) and loaded back."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_sepit import SepitProcessor
from modeling_sepit.processing_sepit import DEFAULT_CHAT_TEMPLATE
from modeling_sepit.pure_llm import (
    load_pure_llm,
    prepare_pure_llm,
    pure_llm_chat_template,
    sequences_as_text,
)

CHAT = [
    {"role": "user", "content": "Compare <protein> with <protein> ."},
    {"role": "assistant", "content": "The first binds <protein> ."},
]


def test_each_tag_becomes_its_sequence_in_order() -> None:
    written = sequences_as_text(CHAT, ["MKT", "GAV", "WWY"])
    assert [message["content"] for message in written] == [
        "Compare <bop>MKT<eop> with <bop>GAV<eop> .",
        "The first binds <bop>WWY<eop> .",
    ]
    assert CHAT[0]["content"] == "Compare <protein> with <protein> ."  # the caller's messages are left as they were
    with pytest.raises(ValueError, match=r"conversation: 3 `<protein>` tags for 2 protein sequences"):
        sequences_as_text(CHAT, ["MKT", "GAV"])


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_prompt_is_sepits_token_for_token(tiny_parts, add_bos) -> None:
    """With SEPIT's processor, the rendered prompt is tokenised with the tokenizer's special tokens; a tokenizer's
    `apply_chat_template` adds none, so the PureLLM template carries the bos itself when the tokenizer adds one."""
    language_model = tiny_parts / "language_model"
    tokenizer = AutoTokenizer.from_pretrained(language_model, add_bos_token=add_bos)
    model = AutoModelForCausalLM.from_pretrained(language_model)
    prepare_pure_llm(model, tokenizer, max_protein_length=64)
    assert tokenizer.chat_template == ("{{ bos_token }}" if add_bos else "") + DEFAULT_CHAT_TEMPLATE
    chat = [{"role": "user", "content": "What does <protein> do ?"}, {"role": "assistant", "content": "It binds."}]
    text_tokenizer = AutoTokenizer.from_pretrained(language_model, add_bos_token=add_bos)
    processor = SepitProcessor(text_tokenizer, AutoTokenizer.from_pretrained(tiny_parts / "protein_model"))
    sepit_text = processor.apply_chat_template(chat).replace("<protein>", "<bop>MKTAYIAK<eop>")
    sepit_ids = tokenizer(sepit_text)["input_ids"]
    pure_ids = tokenizer.apply_chat_template(sequences_as_text(chat, ["MKTAYIAK"]), return_dict=False)
    assert pure_ids == sepit_ids and (pure_ids[0] == tokenizer.bos_token_id) == add_bos


def test_a_plain_llm_made_a_pure_llm_saves_and_loads(tiny_parts, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "language_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_parts / "language_model")
    rows = model.get_input_embeddings().num_embeddings
    prepare_pure_llm(model, tokenizer, max_protein_length=100)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == rows + 2
    assert tokenizer.convert_tokens_to_ids(["<bop>", "<eop>"]) == [rows, rows + 1]
    assert tokenizer.tokenize("<bop>MK<eop>")[0] == "<bop>"  # one special token, never split
    model.save_pretrained(tmp_path / "pure")
    tokenizer.save_pretrained(tmp_path / "pure")
    loaded, loaded_tokenizer = load_pure_llm(tmp_path / "pure")
    assert loaded.config.max_protein_length == 100 and loaded_tokenizer.chat_template == tokenizer.chat_template
    with pytest.raises(ValueError, match=r"x: .* is not a PureLLM folder .* train one with training/pure_llm.py"):
        load_pure_llm(tiny_parts / "language_model", what="x")
    with pytest.raises(ValueError, match="max_protein_length must be an integer >= 1"):
        prepare_pure_llm(model, tokenizer, max_protein_length=0)


def test_a_tokenizer_adding_more_than_a_bos_is_refused(tiny_parts) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "language_model", add_bos_token=True, add_eos_token=True)
    if tokenizer("A")["input_ids"][-1] != tokenizer.eos_token_id:
        pytest.skip("this tokenizer does not take add_eos_token")
    with pytest.raises(ValueError, match=r"language_model_name_or_path: its tokenizer adds \['<s>', '</s>'\]"):
        pure_llm_chat_template(tokenizer)
