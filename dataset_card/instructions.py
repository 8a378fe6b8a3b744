"""SEPIT-style instructions from UniProtKB entries: captions, open-ended per-property Q&A and closed yes/no questions.

Answers are built only from the entry's own field values (joined), never paraphrased, so every answer can be traced
back to the entry and field it came from; randomness (template and negative choice) comes from a seeded
`random.Random` so a dataset build is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from dataset_card.uniprot_reader import UniProtEntry

PROTEIN_TAG = "<protein>"


@dataclass(frozen=True)
class Instruction:
    """One question about one protein; `source_field` names the `UniProtEntry` field the answer comes from."""

    accession: str
    type: str
    question: str
    answer: str
    source_field: str


@dataclass(frozen=True)
class PropertyKind:
    """A question type: the entry field it reads, how values are joined, and its question templates."""

    type: str
    field: str
    sentences: bool
    templates: tuple[str, ...]

    def render(self, values: Sequence[str]) -> str:
        """The answer: sentence-like texts joined as prose, short terms joined as a '; ' list."""
        if self.sentences:
            return " ".join(f"{value}." for value in values)
        return "; ".join(values)


OPEN_ENDED: tuple[PropertyKind, ...] = (
    PropertyKind(
        "function",
        "function",
        True,
        (
            "What is the function of this protein? <protein>",
            "<protein> Describe the biological role of this protein.",
            "Given the protein <protein>, what does it do?",
        ),
    ),
    PropertyKind(
        "catalytic_activity",
        "catalytic_activity",
        False,
        (
            "Which reaction does the protein <protein> catalyze?",
            "<protein> What catalytic activity does this enzyme have?",
            "Describe the chemical reaction carried out by this protein: <protein>",
        ),
    ),
    PropertyKind(
        "ec_number",
        "ec_numbers",
        False,
        (
            "What is the EC number of the protein <protein>?",
            "<protein> Which EC class does this enzyme belong to?",
            "Give the Enzyme Commission number of this protein: <protein>",
        ),
    ),
    PropertyKind(
        "cofactor",
        "cofactor",
        False,
        (
            "Which cofactor does the protein <protein> require?",
            "<protein> What cofactors does this protein use?",
            "What does this protein need as a cofactor? <protein>",
        ),
    ),
    PropertyKind(
        "pathway",
        "pathway",
        False,
        (
            "In which pathway is the protein <protein> involved?",
            "<protein> Which metabolic pathway does this protein take part in?",
            "Name the pathway this protein belongs to: <protein>",
        ),
    ),
    PropertyKind(
        "subcellular_location",
        "subcellular_location",
        False,
        (
            "Where in the cell is the protein <protein> located?",
            "<protein> What is the subcellular location of this protein?",
            "In which cellular compartment is this protein found? <protein>",
        ),
    ),
    PropertyKind(
        "family",
        "similarity",
        True,
        (
            "To which protein family does <protein> belong?",
            "<protein> What family is this protein a member of?",
            "Which family is this protein similar to? <protein>",
        ),
    ),
    PropertyKind(
        "domains",
        "domains",
        False,
        (
            "Which domains does the protein <protein> contain?",
            "<protein> Describe the domain architecture of this protein.",
            "What domains can be found in this protein? <protein>",
        ),
    ),
    PropertyKind(
        "motifs",
        "motifs",
        False,
        (
            "Which sequence motifs does the protein <protein> have?",
            "<protein> List the short sequence motifs of this protein.",
            "What motifs are present in this protein? <protein>",
        ),
    ),
    PropertyKind(
        "ptm",
        "ptm",
        False,
        (
            "Which post-translational modifications does the protein <protein> undergo?",
            "<protein> How is this protein processed or modified after translation?",
            "Describe the PTM and processing of this protein: <protein>",
        ),
    ),
    PropertyKind(
        "tissue_specificity",
        "tissue_specificity",
        True,
        (
            "In which tissues is the protein <protein> expressed?",
            "<protein> What is the tissue specificity of this protein?",
            "Where in the organism is this protein expressed? <protein>",
        ),
    ),
    PropertyKind(
        "go_mf",
        "go_molecular_function",
        False,
        (
            "What molecular functions (GO) does the protein <protein> have?",
            "<protein> List the Gene Ontology molecular function terms of this protein.",
            "Which GO molecular function terms describe this protein? <protein>",
        ),
    ),
    PropertyKind(
        "go_bp",
        "go_biological_process",
        False,
        (
            "In which biological processes (GO) is the protein <protein> involved?",
            "<protein> List the Gene Ontology biological process terms of this protein.",
            "Which GO biological processes does this protein take part in? <protein>",
        ),
    ),
    PropertyKind(
        "go_cc",
        "go_cellular_component",
        False,
        (
            "In which cellular components (GO) is the protein <protein> found?",
            "<protein> List the Gene Ontology cellular component terms of this protein.",
            "Which GO cellular component terms apply to this protein? <protein>",
        ),
    ),
    PropertyKind(
        "keywords",
        "keywords",
        False,
        (
            "Which UniProt keywords describe the protein <protein>?",
            "<protein> Give the keywords associated with this protein.",
            "What keywords are annotated for this protein? <protein>",
        ),
    ),
)

YES_NO: tuple[PropertyKind, ...] = (
    PropertyKind(
        "go_mf",
        "go_molecular_function",
        False,
        (
            "Does the protein <protein> have the molecular function '{value}'?",
            "<protein> Is '{value}' a GO molecular function of this protein?",
            "Is this protein annotated with the molecular function '{value}'? <protein>",
        ),
    ),
    PropertyKind(
        "go_bp",
        "go_biological_process",
        False,
        (
            "Is the protein <protein> involved in the biological process '{value}'?",
            "<protein> Does this protein take part in '{value}'?",
            "Is '{value}' a GO biological process of this protein? <protein>",
        ),
    ),
    PropertyKind(
        "go_cc",
        "go_cellular_component",
        False,
        (
            "Is the protein <protein> found in the cellular component '{value}'?",
            "<protein> Is '{value}' a GO cellular component of this protein?",
            "Does this protein localize to '{value}'? <protein>",
        ),
    ),
    PropertyKind(
        "keywords",
        "keywords",
        False,
        (
            "Is the protein <protein> annotated with the keyword '{value}'?",
            "<protein> Does the keyword '{value}' apply to this protein?",
            "Is '{value}' one of the UniProt keywords of this protein? <protein>",
        ),
    ),
    PropertyKind(
        "subcellular_location",
        "subcellular_location",
        False,
        (
            "Is the protein <protein> located in '{value}'?",
            "<protein> Can this protein be found in '{value}'?",
            "Is '{value}' a subcellular location of this protein? <protein>",
        ),
    ),
    PropertyKind(
        "family",
        "similarity",
        False,
        (
            "Is this statement true of the protein <protein>: '{value}'?",
            "<protein> Does this protein fit the family statement '{value}'?",
            "Regarding family membership, is '{value}' correct for this protein? <protein>",
        ),
    ),
    PropertyKind(
        "ec_number",
        "ec_numbers",
        False,
        (
            "Does the protein <protein> have the EC number {value}?",
            "<protein> Is {value} the Enzyme Commission number of this enzyme?",
            "Is this protein classified as EC {value}? <protein>",
        ),
    ),
)

_NEGATIVE_TRIES = 16


CAPTION_TEMPLATES: tuple[str, ...] = (
    "Describe the protein <protein>.",
    "<protein> Give a functional description of this protein.",
    "What can you tell me about this protein? <protein>",
    "Summarize the known properties of the protein <protein>.",
)


def caption(entry: UniProtEntry) -> str:
    """A one-paragraph description of the protein (stage 0/1 captioning) made only of the entry's own texts."""
    parts: list[str] = []
    if entry.protein_name:
        parts.append(
            f"{entry.protein_name} is a protein from {entry.organism}." if entry.organism else f"{entry.protein_name}."
        )
    parts.extend(f"{text}." for text in entry.function)
    labelled = (
        ("Catalytic activity", entry.catalytic_activity),
        ("Cofactor", entry.cofactor),
        ("Pathway", entry.pathway),
        ("Subcellular location", entry.subcellular_location),
        ("Domains", entry.domains),
        ("Tissue specificity", entry.tissue_specificity),
    )
    parts.extend(f"{label}: {'; '.join(values)}." for label, values in labelled if values)
    parts.extend(f"{text}." for text in entry.similarity)
    return " ".join(parts)


def caption_instruction(entry: UniProtEntry, rng: random.Random) -> Instruction | None:
    """The stage-1 captioning instruction (a templated request for a description, the caption as answer)."""
    text = caption(entry)
    if not text:
        return None
    return Instruction(entry.accession, "caption", rng.choice(CAPTION_TEMPLATES), text, "caption")


def open_ended_questions(entry: UniProtEntry, rng: random.Random) -> list[Instruction]:
    """One question per property the entry has, with a template drawn from `rng` and the entry's text as answer."""
    instructions = []
    for kind in OPEN_ENDED:
        values = getattr(entry, kind.field)
        if values:
            question = rng.choice(kind.templates)
            instructions.append(Instruction(entry.accession, kind.type, question, kind.render(values), kind.field))
    return instructions


class ValuePools:
    """Per-type pools of distinct property values that yes/no negatives are drawn from.

    A pool keeps at most `capacity` values (reservoir sampling over the distinct values seen), so a build over all of
    Swiss-Prot holds a bounded sample rather than every GO term and keyword of every protein.
    """

    def __init__(self, capacity: int = 50_000, seed: int = 0):
        self.capacity = capacity
        self._rng = random.Random(seed)
        self._pools: dict[str, list[str]] = {kind.type: [] for kind in YES_NO}
        self._members: dict[str, set[str]] = {kind.type: set() for kind in YES_NO}
        self._seen: dict[str, int] = {kind.type: 0 for kind in YES_NO}

    def add(self, entry: UniProtEntry) -> None:
        for kind in YES_NO:
            pool, members = self._pools[kind.type], self._members[kind.type]
            for value in getattr(entry, kind.field):
                if value in members:
                    continue
                self._seen[kind.type] += 1
                if len(pool) < self.capacity:
                    pool.append(value)
                    members.add(value)
                    continue
                slot = self._rng.randrange(self._seen[kind.type])
                if slot < self.capacity:
                    members.discard(pool[slot])
                    pool[slot] = value
                    members.add(value)

    def negative(self, kind: PropertyKind, own: set[str], rng: random.Random) -> str | None:
        """A value of this type that the protein does not have: a few random draws, then an exhaustive fallback."""
        pool = self._pools[kind.type]
        if not pool:
            return None
        for _ in range(_NEGATIVE_TRIES):
            value = rng.choice(pool)
            if value not in own:
                return value
        candidates = [value for value in pool if value not in own]
        return rng.choice(candidates) if candidates else None


def entry_yes_no_questions(entry: UniProtEntry, pools: ValuePools, rng: random.Random) -> list[Instruction]:
    """Closed questions in Yes/No pairs per type: a value the protein has, and one from another protein it lacks.

    Pairs keep the set exactly balanced; a type whose pool holds no value foreign to the protein yields no pair.
    """
    instructions = []
    for kind in YES_NO:
        own = getattr(entry, kind.field)
        if not own:
            continue
        negative = pools.negative(kind, set(own), rng)
        if negative is None:
            continue
        for value, answer in ((rng.choice(own), "Yes"), (negative, "No")):
            question = rng.choice(kind.templates).format(value=value)
            instructions.append(Instruction(entry.accession, f"yes_no:{kind.type}", question, answer, kind.field))
    return instructions


def yes_no_questions(entries: Sequence[UniProtEntry], rng: random.Random) -> list[Instruction]:
    """`entry_yes_no_questions` for every entry, negatives drawn from the values of all `entries`."""
    pools = ValuePools()
    for entry in entries:
        pools.add(entry)
    return [instruction for entry in entries for instruction in entry_yes_no_questions(entry, pools, rng)]
