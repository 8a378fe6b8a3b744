"""SEPIT instruction dataset: UniProtKB readers and instruction (caption / Q&A) generation."""

from dataset_card.instructions import Instruction, caption, open_ended_questions, yes_no_questions
from dataset_card.uniprot_reader import ReadProblem, ReadReport, UniProtEntry, iter_entries

__all__ = [
    "Instruction",
    "ReadProblem",
    "ReadReport",
    "UniProtEntry",
    "caption",
    "iter_entries",
    "open_ended_questions",
    "yes_no_questions",
]
