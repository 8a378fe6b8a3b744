"""Instruction generation on the real demo corpus: traceable answers, balanced yes/no, reproducible with a seed."""

import random
import re
from pathlib import Path

import pytest

from dataset_card.instructions import OPEN_ENDED, PROTEIN_TAG, YES_NO, caption, open_ended_questions, yes_no_questions
from dataset_card.uniprot_reader import UniProtEntry, iter_entries

DATA = Path(__file__).resolve().parents[2] / "dataset_card" / "data" / "uniprot"
KINDS = {kind.type: kind for kind in OPEN_ENDED}


@pytest.fixture(scope="module")
def entries() -> list[UniProtEntry]:
    return [
        e for folder in ("uniprot_flat_core", "uniprot_flat_store", "uniprot_json") for e in iter_entries(DATA / folder)
    ]


def _is_made_of(answer: str, values: list[str]) -> bool:
    """True when removing the field's values from the answer leaves only the joining punctuation."""
    for value in sorted(values, key=len, reverse=True):
        answer = answer.replace(value, "")
    return re.fullmatch(r"[\s.;]*", answer) is not None


def _template_pattern(template: str) -> re.Pattern[str]:
    """The template as a regex capturing the value put into it."""
    before, after = template.split("{value}")
    return re.compile(re.escape(before) + "(.+)" + re.escape(after))


def test_open_ended_answers_are_traceable(entries) -> None:
    rng = random.Random(0)
    pairs = [(e, i) for e in entries for i in open_ended_questions(e, rng)]
    assert {i.type for _, i in pairs} == set(KINDS)
    for entry, instruction in pairs:
        assert instruction.accession == entry.accession
        values = getattr(entry, instruction.source_field)
        assert instruction.answer == KINDS[instruction.type].render(values)
        assert _is_made_of(instruction.answer, values)
        assert instruction.question.count(PROTEIN_TAG) == 1


def test_one_question_per_present_property(entries) -> None:
    for entry in entries[:20]:
        types = [i.type for i in open_ended_questions(entry, random.Random(1))]
        assert types == [kind.type for kind in OPEN_ENDED if getattr(entry, kind.field)]


def test_templates_vary_and_have_one_protein_tag() -> None:
    for kind in OPEN_ENDED + YES_NO:
        assert len(set(kind.templates)) >= 3
        assert all(t.count(PROTEIN_TAG) == 1 for t in kind.templates)


def test_yes_no_balanced_and_grounded(entries) -> None:
    instructions = yes_no_questions(entries, random.Random(0))
    assert len(instructions) > 100
    share_yes = sum(i.answer == "Yes" for i in instructions) / len(instructions)
    assert 0.45 <= share_yes <= 0.55
    assert {i.answer for i in instructions} == {"Yes", "No"}
    by_accession: dict[str, list[UniProtEntry]] = {}
    for entry in entries:  # the JSON corpus repeats a few accessions across files
        by_accession.setdefault(entry.accession, []).append(entry)
    patterns = {f"yes_no:{kind.type}": [_template_pattern(t) for t in kind.templates] for kind in YES_NO}
    for instruction in instructions:
        assert instruction.question.count(PROTEIN_TAG) == 1
        (asked,) = [m.group(1) for p in patterns[instruction.type] if (m := p.fullmatch(instruction.question))]
        own = {v for e in by_accession[instruction.accession] for v in getattr(e, instruction.source_field)}
        assert (asked in own) == (instruction.answer == "Yes"), instruction


def test_seeded_output_is_reproducible(entries) -> None:
    def build(seed: int) -> list:
        rng = random.Random(seed)
        return [i for e in entries for i in open_ended_questions(e, rng)] + yes_no_questions(entries, rng)

    assert build(7) == build(7)
    assert build(7) != build(8)


def test_caption_uses_only_entry_text(entries) -> None:
    entry = next(e for e in entries if e.accession == "P05067")
    text = caption(entry)
    assert text.startswith("Amyloid-beta precursor protein is a protein from Homo sapiens (Human).")
    assert entry.function[0] in text and "Belongs to the APP family." in text and "Cell membrane" in text
    assert all(caption(e) for e in entries if e.protein_name)
