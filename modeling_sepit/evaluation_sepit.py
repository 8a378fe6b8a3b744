"""Answers for an evaluation split, from SEPIT and from the two baselines of the same harness: the same model with the
structure withheld (sequence only), and its LLM with no protein at all (the question alone). Scoring is in
`metrics_sepit`; this module only generates."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .modeling_sepit import SepitForConditionalGeneration
from .processing_sepit import SepitProcessor

SEPIT = "sepit"
STRUCTURE_WITHHELD = "sepit, structure withheld"
NO_PROTEIN = "llm only, no protein"
SYSTEMS = (SEPIT, STRUCTURE_WITHHELD, NO_PROTEIN)
CLOSED_PREFIX = "yes_no:"


def is_closed(question_type: str) -> bool:
    """Yes/no questions are scored by accuracy; the rest by text metrics."""
    return question_type.startswith(CLOSED_PREFIX)


def _question_without_protein(question: str, tag: str) -> str:
    return re.sub(r"\s+", " ", question.replace(tag, " ")).strip()


def _requests(rows: Sequence[dict], system: str, tag: str) -> Iterator[tuple[list[dict], list]]:
    """(user turn, proteins) per row, as `system` sees it."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
    for row in rows:
        question = row["question"]
        if system == NO_PROTEIN:
            yield [{"role": "user", "content": _question_without_protein(question, tag)}], []
            continue
        protein = {"sequence": row["sequence"]}
        if system == SEPIT and row.get("coords") is not None:
            protein.update(coords=row["coords"], coords_mask=row.get("coords_mask"))
        yield [{"role": "user", "content": question}], [protein]


@torch.no_grad()
def generate_answers(
    model: SepitForConditionalGeneration,
    processor: SepitProcessor,
    rows: Sequence[dict],
    system: str = SEPIT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to every row's `question` (rows of the SEPIT instruction dataset), in row order.

    Rows are batched by sequence length, so a batch pads little; the answers come back in the rows' order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    requests = list(_requests(rows, system, processor.protein_token))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["sequence"]))
    answers: list[str] = [""] * len(rows)
    model.eval()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=f"generating ({system})", disable=not progress):
        conversations = [requests[i][0] for i in batch]
        proteins = [requests[i][1] for i in batch]
        inputs = processor.apply_chat_template(
            conversations,
            proteins=proteins if any(proteins) else None,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        ).to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            answers[i] = text.strip()
    return answers


__all__ = ["NO_PROTEIN", "SEPIT", "STRUCTURE_WITHHELD", "SYSTEMS", "generate_answers", "is_closed"]
