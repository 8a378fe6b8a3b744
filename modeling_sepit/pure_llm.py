"""The paper's PureLLM baseline: the same LLM fine-tuned on the same instructions with each protein's amino-acid
sequence written into the prompt as text, `<bop>SEQUENCE<eop>` where SEPIT has `<protein>` (U-rara/SEPIT's
`PureLLMPretrainTask`): what a user without SEPIT would do. Its folder is a plain causal LM and tokenizer, whose chat
template is SEPIT's, so it loads anywhere with `AutoModelForCausalLM` / `AutoTokenizer`.

`training/pure_llm.py` trains it (batches from `training_sepit.SequenceAsTextCollator`); `evaluation_sepit` answers
with it beside SEPIT."""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .configuration_sepit import PROTEIN_TOKEN
from .processing_sepit import DEFAULT_CHAT_TEMPLATE

# The original's markers around a sequence written as text, added to the tokenizer as special tokens as it did.
BEGIN_PROTEIN, END_PROTEIN = "<bop>", "<eop>"
# Text tokens per training conversation (the original's 2 x 1024).
DEFAULT_MAX_LENGTH = 2048


def sequences_as_text(messages: list[dict], sequences: list[str], where: str = "conversation") -> list[dict]:
    """Chat messages (string contents) with their `<protein>` tags replaced, in order, by `<bop>SEQUENCE<eop>`; one
    sequence per tag."""
    tags = sum(message["content"].count(PROTEIN_TOKEN) for message in messages)
    if tags != len(sequences):
        raise ValueError(
            f"{where}: {tags} `<protein>` tags for {len(sequences)} protein sequences; put one `<protein>` where each "
            "protein goes"
        )
    written = iter(f"{BEGIN_PROTEIN}{sequence}{END_PROTEIN}" for sequence in sequences)
    result = []
    for message in messages:
        pieces = message["content"].split(PROTEIN_TOKEN)
        content = pieces[0] + "".join(next(written) + piece for piece in pieces[1:])
        result.append({**message, "content": content})
    return result


def pure_llm_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """SEPIT's chat template, led by `{{ bos_token }}` when the tokenizer puts a bos token before a text (Llama's
    `<s>`), as Llama-2's own template is: `SepitProcessor` tokenises the rendered prompt with the tokenizer's special
    tokens, a tokenizer's `apply_chat_template` adds none, so only a bos in the template gives the PureLLM the start
    SEPIT's LLM gets, from any caller (`pipeline("text-generation")` included)."""
    plain = tokenizer("A", add_special_tokens=False)["input_ids"]
    marked = tokenizer("A")["input_ids"]
    if marked == plain:
        return DEFAULT_CHAT_TEMPLATE
    if tokenizer.bos_token_id is not None and marked == [tokenizer.bos_token_id, *plain]:
        return "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    added = tokenizer.convert_ids_to_tokens([token for token in marked if token not in plain])
    raise ValueError(
        f"language_model_name_or_path: its tokenizer adds {added} around a text; the PureLLM prompt can place only a "
        "leading bos token (as Llama's tokenizers add)"
    )


def prepare_pure_llm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_protein_length: int) -> None:
    """Make a plain causal LM and its tokenizer a PureLLM to train: `<bop>`/`<eop>` as special tokens (embeddings
    grown to hold them), a pad token (the eos when there is none, as `SepitProcessor.from_pretrained_parts` does),
    SEPIT's chat template, and `max_protein_length` (residues written per protein) recorded in the model's config,
    where the evaluation reads the cut the model was trained with."""
    if isinstance(max_protein_length, bool) or not isinstance(max_protein_length, int) or max_protein_length < 1:
        raise ValueError(f"max_protein_length must be an integer >= 1, got {max_protein_length!r}")
    tokenizer.add_special_tokens({"additional_special_tokens": [BEGIN_PROTEIN, END_PROTEIN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = pure_llm_chat_template(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # never shrink a padded vocabulary
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.max_protein_length = max_protein_length


def load_pure_llm(
    name_or_path: str | os.PathLike, dtype: str = "float32", what: str = "pure_llm_model_name_or_path"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A PureLLM folder (`training/pure_llm.py`'s output) as model and tokenizer; a folder that is no PureLLM (no
    `<bop>`/`<eop>` tokens, no recorded `max_protein_length`) is a ValueError naming `what`."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    known = tokenizer.convert_tokens_to_ids([BEGIN_PROTEIN, END_PROTEIN])
    if (
        tokenizer.unk_token_id in known
        or None in known
        or not hasattr(AutoConfig.from_pretrained(name_or_path), "max_protein_length")
    ):
        raise ValueError(
            f"{what}: {name_or_path} is not a PureLLM folder (no {BEGIN_PROTEIN}/{END_PROTEIN} tokens or no "
            "max_protein_length in its config); train one with training/pure_llm.py"
        )
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype), tokenizer


__all__ = [
    "BEGIN_PROTEIN",
    "DEFAULT_MAX_LENGTH",
    "END_PROTEIN",
    "load_pure_llm",
    "prepare_pure_llm",
    "pure_llm_chat_template",
    "sequences_as_text",
]
