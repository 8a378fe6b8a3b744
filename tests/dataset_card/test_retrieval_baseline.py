"""The retrieval baseline on synthetic proteins of known identity (point mutants of one random sequence): the
neighbour is the most identical training protein asked a question of the same type; an identical sequence gives its
answer exactly; yes/no questions fall back to the training majority for the question, then for the type; ties go to
the protein first in the training rows, whatever the thread count; a type training lacks draws on its kind; the
summary's median and fraction at >= 50%."""

import random

import pytest

from dataset_card.homology import nearest_identities, sequence_identity
from dataset_card.retrieval_baseline import (
    NEIGHBOUR,
    POOL_MAJORITY,
    QUESTION_MAJORITY,
    neighbour_summary,
    question_key,
    retrieve_answers,
)

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
LENGTH = 120


def _random(seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(AMINO_ACIDS) for _ in range(LENGTH))


BASE = _random(0)


def _mutant(positions: range) -> str:
    """BASE with a different residue at each of `positions` (every 6th residue or so keeps the alignment ungapped)."""
    residues = list(BASE)
    for position in positions:
        residues[position] = AMINO_ACIDS[(AMINO_ACIDS.index(residues[position]) + 7) % len(AMINO_ACIDS)]
    return "".join(residues)


CLOSE = _mutant(range(0, LENGTH, 10))  # 12 substitutions: 90%
FAR = _mutant(range(0, LENGTH, 4))  # 30 substitutions: 75%
TWIN_A = _mutant(range(0, LENGTH, 6))  # 20 substitutions each, at different places: equally identical
TWIN_B = _mutant(range(3, LENGTH, 6))


def _row(accession: str, sequence: str, kind: str, question: str, answer: str) -> dict:
    return {"accession": accession, "sequence": sequence, "type": kind, "question": question, "answer": answer}


def test_the_synthetic_identities_are_as_designed() -> None:
    identities = [sequence_identity(BASE, other) for other in (CLOSE, FAR, TWIN_A, TWIN_B)]
    assert identities == pytest.approx([108 / 120, 90 / 120, 100 / 120, 100 / 120])


def test_the_neighbour_is_the_most_identical_protein_asked_that_type() -> None:
    training = [
        _row("CLOSE", CLOSE, "function", "What does <protein> do?", "close function"),
        _row("FAR", FAR, "function", "What does <protein> do?", "far function"),
        _row("FAR", FAR, "family", "<protein> family?", "far family"),
        _row("OTHER", _random(1), "family", "<protein> family?", "other family"),
    ]
    questions = [
        _row("Q", BASE, "function", "Given <protein>, what does it do?", "?"),  # another phrasing: same type suffices
        _row("Q", BASE, "family", "What family is <protein> in?", "?"),  # CLOSE has no family answer: FAR's
    ]
    function, family = retrieve_answers(questions, training)
    assert (function.answer, function.source, function.neighbour) == ("close function", NEIGHBOUR, "CLOSE")
    assert function.identity == pytest.approx(0.9)
    assert (family.answer, family.source, family.neighbour) == ("far family", NEIGHBOUR, "FAR")
    assert family.identity == pytest.approx(0.75)


def test_an_identical_training_sequence_gives_its_answer_exactly() -> None:
    training = [
        _row("CLOSE", CLOSE, "function", "What does <protein> do?", "close function"),
        _row("SAME", BASE, "function", "What does <protein> do?", "  the very same answer, verbatim. "),
        _row("SAME", BASE, "yes_no:go_mf", "Does <protein> have 'kinase activity'?", "No"),
        _row("CLOSE", CLOSE, "yes_no:go_mf", "Does <protein> have 'kinase activity'?", "Yes"),
    ]
    questions = [
        _row("Q", BASE, "function", "What is the function of <protein>?", "?"),
        _row("Q", BASE, "yes_no:go_mf", "<protein> Is 'kinase activity' a GO molecular function of it?", "?"),
    ]
    function, closed = retrieve_answers(questions, training)
    assert (function.answer, function.neighbour, function.identity) == (
        "  the very same answer, verbatim. ",
        "SAME",
        1.0,
    )
    assert (closed.answer, closed.source, closed.neighbour) == ("No", NEIGHBOUR, "SAME")  # the same quoted term


def test_yes_no_falls_back_to_the_majority_for_the_question_then_the_type() -> None:
    kind = "yes_no:keywords"
    training = [
        _row("CLOSE", CLOSE, kind, "Does the keyword 'Kinase' apply to <protein>?", "Yes"),
        _row("A", _random(2), kind, "Is 'Membrane' a keyword of <protein>?", "No"),
        _row("B", _random(3), kind, "<protein>: keyword 'Membrane'?", "No"),
        _row("C", _random(4), kind, "Is 'Membrane' one of the keywords of <protein>?", "Yes"),
        _row("D", _random(5), kind, "Is 'Zinc' a keyword of <protein>?", "Yes"),
    ]
    questions = [
        _row("Q", BASE, kind, "Is 'membrane' one of the UniProt keywords of this protein? <protein>", "?"),
        _row("Q", BASE, kind, "Is 'Repeat' a keyword of <protein>?", "?"),  # asked of no training protein
    ]
    by_question, by_type = retrieve_answers(questions, training)
    assert by_question.neighbour == "CLOSE"  # the neighbour was not asked about 'membrane'
    assert (by_question.answer, by_question.source) == ("No", QUESTION_MAJORITY)  # 2 No to 1 Yes
    assert (by_type.answer, by_type.source) == ("Yes", POOL_MAJORITY)  # 3 Yes to 2 No over the type


def test_ties_go_to_the_first_training_protein_whatever_the_threads() -> None:
    for first, second in (("TWIN_A", "TWIN_B"), ("TWIN_B", "TWIN_A")):
        sequences = {"TWIN_A": TWIN_A, "TWIN_B": TWIN_B}
        training = [
            _row(first, sequences[first], "function", "What does <protein> do?", f"{first} function"),
            _row(second, sequences[second], "function", "What does <protein> do?", f"{second} function"),
            _row("ANSWERS_FIRST", FAR, "yes_no:family", "Is <protein> in 'kinase family'?", "Yes"),
            _row("ANSWERS_FIRST", FAR, "yes_no:family", "Is <protein> in 'globin family'?", "No"),
        ]
        questions = [_row("Q", BASE, "function", "What does <protein> do?", "?")]
        for _ in range(3):
            (found,) = retrieve_answers(questions, training)
            assert (found.neighbour, found.answer) == (first, f"{first} function")
        references = [sequences[first], sequences[second]]
        for threads in (1, 2, 4):
            assert nearest_identities([BASE], references, 0.1, threads=threads)[0].reference == 0
        # a majority tie: the answer seen first
        closed = [_row("Q", BASE, "yes_no:family", "Is <protein> in 'myosin family'?", "?")]
        assert retrieve_answers(closed, training)[0].answer == "Yes"


def test_a_type_training_lacks_draws_on_every_row_of_its_kind() -> None:
    training = [
        _row("CLOSE", CLOSE, "function", "What does <protein> do?", "close function"),
        _row("FAR", FAR, "yes_no:go_mf", "Does <protein> have 'metal ion binding'?", "No"),
        _row("FAR", FAR, "yes_no:go_mf", "Does <protein> have 'kinase activity'?", "No"),
        _row("OTHER", _random(6), "yes_no:go_cc", "Is <protein> in 'nucleus'?", "Yes"),
    ]
    questions = [
        _row(
            "Q", BASE, "yes_no:instructprotein_metal_ion_binding", "<protein> Does this protein bind metal ions?", "?"
        ),
        _row("Q", BASE, "tissue_specificity", "Where is <protein> expressed?", "?"),
    ]
    closed, open_ended = retrieve_answers(questions, training)
    assert (closed.neighbour, closed.answer, closed.source) == ("FAR", "No", POOL_MAJORITY)  # yes/no rows only
    assert (open_ended.neighbour, open_ended.answer, open_ended.source) == ("CLOSE", "close function", NEIGHBOUR)


def test_the_summary_of_the_neighbours_identities() -> None:
    training = [_row("SAME", BASE, "function", "f <protein>", "a"), _row("FAR", FAR, "family", "g <protein>", "b")]
    questions = [
        _row("Q1", BASE, "function", "f <protein>", "?"),
        _row("Q2", CLOSE, "function", "f <protein>", "?"),  # BASE at 90%
        _row("Q3", CLOSE, "family", "g <protein>", "?"),  # FAR: 30 + 12 substitutions, some shared
    ]
    retrieved = retrieve_answers(questions, training)
    summary = neighbour_summary(retrieved)
    assert summary["questions"] == summary["with_neighbour"] == 3
    assert summary["median_identity"] == pytest.approx(0.9)
    assert summary["fraction_at_least_50"] == 1.0
    assert summary["answers_by_source"] == {NEIGHBOUR: 3}


def test_what_makes_two_questions_the_same() -> None:
    assert question_key("Is 'Cell membrane' a location of <protein>?") == "cell membrane"
    assert question_key("<protein> Can it be found in 'Cell  membrane'?") == "cell membrane"
    assert question_key("Is 'Belongs to the 5'-nucleotidase family' true of <protein>?") == (
        "belongs to the 5'-nucleotidase family"
    )
    assert question_key("<protein>  Does this protein bind metal ions?") == question_key(
        "does this protein bind metal ions? <protein>"
    )


def test_no_training_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="training: no rows"):
        retrieve_answers([_row("Q", BASE, "function", "f <protein>", "?")], [])
