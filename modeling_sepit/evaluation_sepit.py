"""Answers for an evaluation split, from SEPIT and from its baselines: the same model with the structure withheld
(sequence only), its LLM with no protein at all (the question alone), and the paper's PureLLM (`pure_llm`: an LLM
fine-tuned on the same questions with the sequence written in the prompt as text). Scoring is in `metrics_sepit`;
this module only generates."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .configuration_sepit import PROTEIN_TOKEN
from .modeling_sepit import SepitForConditionalGeneration
from .processing_sepit import SepitProcessor
from .pure_llm import sequences_as_text

SEPIT = "sepit"
STRUCTURE_WITHHELD = "sepit, structure withheld"
NO_PROTEIN = "llm only, no protein"
PURE_LLM = "purellm, sequence as text"
SYSTEMS = (SEPIT, STRUCTURE_WITHHELD, NO_PROTEIN, PURE_LLM)
# The systems a SEPIT model answers as; PURE_LLM is a model of its own (a PureLLM folder and its tokenizer).
SEPIT_SYSTEMS = (SEPIT, STRUCTURE_WITHHELD, NO_PROTEIN)
CLOSED_PREFIX = "yes_no:"


def is_closed(question_type: str) -> bool:
    """Yes/no questions are scored by accuracy; the rest by text metrics."""
    return question_type.startswith(CLOSED_PREFIX)


def _question_without_protein(question: str, tag: str) -> str:
    return re.sub(r"\s+", " ", question.replace(tag, " ")).strip()


def _requests(
    rows: Sequence[dict], system: str, tag: str, max_residues: int | None = None
) -> Iterator[tuple[list[dict], list]]:
    """(user turn, proteins) per row, as `system` sees it; PureLLM's sequences are cut at `max_residues`."""
    for row in rows:
        question = row["question"]
        if system == PURE_LLM:
            turn = [{"role": "user", "content": question}]
            yield sequences_as_text(turn, [row["sequence"][:max_residues]], f"question {question!r}"), []
            continue
        if system == NO_PROTEIN:
            yield [{"role": "user", "content": _question_without_protein(question, tag)}], []
            continue
        protein = {"sequence": row["sequence"]}
        if system == SEPIT and row.get("coords") is not None:
            protein.update(coords=row["coords"], coords_mask=row.get("coords_mask"))
        yield [{"role": "user", "content": question}], [protein]


@torch.no_grad()
def generate_answers(
    model: SepitForConditionalGeneration | PreTrainedModel,
    processor: SepitProcessor | PreTrainedTokenizerBase,
    rows: Sequence[dict],
    system: str = SEPIT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to every row's `question` (rows of the SEPIT instruction dataset), in row order. `model` and
    `processor` are a SEPIT model and its processor, or for `PURE_LLM` a PureLLM and its tokenizer
    (`pure_llm.load_pure_llm`), which reads the sequence cut as it was trained (its config's `max_protein_length`).

    Rows are batched by sequence length, so a batch pads little; the answers come back in the rows' order."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pure = system == PURE_LLM
    if pure != isinstance(processor, PreTrainedTokenizerBase):
        raise ValueError(
            f"processor: {system!r} is answered by "
            f"{'a PureLLM and its tokenizer' if pure else 'a SEPIT model and its SepitProcessor'}, got a "
            f"{type(processor).__name__}"
        )
    if pure:
        requests = list(_requests(rows, system, PROTEIN_TOKEN, model.config.max_protein_length))
    else:
        requests = list(_requests(rows, system, processor.protein_token))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["sequence"]))
    answers: list[str] = [""] * len(rows)
    model.eval()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=f"generating ({system})", disable=not progress):
        conversations = [requests[i][0] for i in batch]
        proteins = [requests[i][1] for i in batch]
        common = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
        if pure:
            inputs = processor.apply_chat_template(
                conversations, padding=True, tokenizer_kwargs={"padding_side": "left"}, **common
            )
        else:
            inputs = processor.apply_chat_template(
                conversations,
                proteins=proteins if any(proteins) else None,
                processor_kwargs={"padding": True, "padding_side": "left"},
                **common,
            )
        inputs = inputs.to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=(processor if pure else processor.tokenizer).pad_token_id,
        )
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            answers[i] = text.strip()
    return answers


__all__ = [
    "NO_PROTEIN",
    "PURE_LLM",
    "SEPIT",
    "SEPIT_SYSTEMS",
    "STRUCTURE_WITHHELD",
    "SYSTEMS",
    "generate_answers",
    "is_closed",
]
