"""The retrieval baseline of the evaluation: no model, only the training split. Each test question gets the answer
that the most similar training protein (highest sequence identity, `homology.nearest_identities`, the alignment the
splits are built with) gives to a question of the same type; for a yes/no question, that neighbour's answer to the
same question, else the training majority for that question, else for its type.

RAPM (2025) found such retrieval beating published protein LLMs on the usual Swiss-Prot splits, where test proteins
have close training homologues; on this project's homology-controlled splits (no test protein at >= 50% identity to a
training one) it should be weak. It is scored beside the models so that the table shows which it is, and
`neighbour_summary` reports the identities it relied on.

Rules, each deterministic:
- A question's pool is the training rows of its type; when training has none of that type (InstructProtein's
  benchmarks), every training row of its kind (yes/no or open-ended), else every training row.
- The neighbour is the pool's protein most identical to the test protein; ties go to the protein that comes first in
  the training rows. An identical training sequence is identity 1.
- "The same question" is the same quoted term (the `'...'` that yes/no questions ask about, as in
  `instructions.YES_NO` and SEPIT-Data), else the same text with `<protein>`, case and spacing ignored.
- The neighbour's answer: to the same question if it was asked it, else (open-ended) its first answer of that type.
- Else the majority: the most frequent training answer to the same question in the pool, else in the whole pool;
  ties go to the answer seen first. A test protein without a neighbour measured exactly (every alignment bound below
  `threshold`) is answered by the majority too.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dataset_card.homology import Nearest, nearest_identities
from modeling_sepit.configuration_sepit import PROTEIN_TOKEN
from modeling_sepit.evaluation_sepit import is_closed

RETRIEVAL = "retrieval, nearest training protein"
# Identities at or above it are measured exactly; a test protein whose every alignment bound falls below it has no
# neighbour. Homology-controlled splits put most neighbours between 25% and 50%: 0.1 measures them all.
RETRIEVAL_THRESHOLD = 0.1
HOMOLOGUE_IDENTITY = 0.5  # the splits' clustering threshold: a neighbour at or above it is a homologue
NEIGHBOUR, QUESTION_MAJORITY, POOL_MAJORITY = "neighbour", "majority for the question", "majority for the type or kind"


@dataclass(frozen=True)
class Retrieved:
    """The retrieval answer to one test question, and where it came from: `source` is `NEIGHBOUR` or a majority.
    `neighbour` (an accession) and `identity` describe the nearest training protein of the pool even when the answer
    is a majority; both are None when none was measured exactly."""

    answer: str
    source: str
    neighbour: str | None
    identity: float | None


def question_key(question: str) -> str:
    """What makes two questions the same: the quoted term, else the text without `<protein>`, case and spacing."""
    quoted = re.search(r"'(.+)'", question)
    text = quoted.group(1) if quoted else question.replace(PROTEIN_TOKEN, " ")
    return " ".join(text.lower().split())


Pool = tuple[str, str]  # ("type", a question type), ("kind", "yes/no" | "open-ended") or ("all", "")
EVERY_ROW: Pool = ("all", "")


def _pools_of(question_type: str) -> tuple[Pool, Pool, Pool]:
    """The pools a question draws from, first choice first: its type, its kind, every row."""
    return ("type", question_type), ("kind", "yes/no" if is_closed(question_type) else "open-ended"), EVERY_ROW


def _nearest(
    queries: Sequence[str],
    pools: dict[Pool, list[str]],
    wanted: dict[Pool, set[str]],
    sequences: dict[str, str],
    threshold: float,
) -> dict[tuple[str, Pool], Nearest]:
    """(test sequence, pool) -> the nearest pool protein (`reference`: its position in the pool) for every pair in
    `wanted` (pool -> test sequences). One search against every training protein serves each pair whose nearest
    protein is in the pool (the first of tied ones there too: pools keep the training order); only the others are
    searched again within their pool."""
    everyone = list(sequences)
    found = dict(zip(queries, nearest_identities(queries, list(sequences.values()), threshold), strict=True))
    result: dict[tuple[str, Pool], Nearest] = {}
    again: dict[tuple[str, ...], set[str]] = {}  # pool members -> queries to search among them (pools often coincide)
    for pool, asked in wanted.items():
        position = {accession: index for index, accession in enumerate(pools[pool])}
        for query in asked:
            nearest = found[query]
            if nearest.reference is None:  # every bound below the threshold: within the pool too
                result[query, pool] = nearest
            elif everyone[nearest.reference] in position:
                result[query, pool] = Nearest(position[everyone[nearest.reference]], nearest.identity, True)
            else:
                again.setdefault(tuple(pools[pool]), set()).add(query)
    within: dict[tuple[str, tuple[str, ...]], Nearest] = {}
    for members, searched in again.items():
        ordered = sorted(searched)
        references = [sequences[accession] for accession in members]
        for query, nearest in zip(ordered, nearest_identities(ordered, references, threshold), strict=True):
            within[query, members] = nearest
    for pool, asked in wanted.items():
        for query in asked:
            if (query, pool) not in result:
                result[query, pool] = within[query, tuple(pools[pool])]
    return result


def retrieve_answers(
    questions: Sequence[dict[str, Any]], training: Sequence[dict[str, Any]], threshold: float = RETRIEVAL_THRESHOLD
) -> list[Retrieved]:
    """The retrieval answer to each of `questions` (rows with `sequence`, `type` and `question`) from the `training`
    rows (with `accession`, `sequence`, `type`, `question` and `answer`), in question order; see the module's rules.
    `threshold`: identities at or above it are measured exactly (`homology.nearest_identities`); lower costs more
    alignments."""
    if not training:
        raise ValueError("training: no rows; the retrieval baseline answers from the training split's questions")
    sequences: dict[str, str] = {}  # accession -> sequence, in training order
    members: dict[Pool, set[str]] = {}
    asked: dict[tuple[Pool, str, str], str] = {}  # (pool, accession, question key) -> that protein's first answer
    first_answer: dict[tuple[Pool, str], str] = {}  # (pool, accession) -> its first answer in the pool
    votes: dict[tuple[Pool, str | None], Counter[str]] = {}  # (pool, question key or None for all) -> answers
    for row in training:
        accession, key, answer = row["accession"], question_key(row["question"]), row["answer"]
        sequences.setdefault(accession, row["sequence"])
        for pool in _pools_of(row["type"]):
            members.setdefault(pool, set()).add(accession)
            first_answer.setdefault((pool, accession), answer)
            asked.setdefault((pool, accession, key), answer)
            for votes_key in ((pool, key), (pool, None)):
                votes.setdefault(votes_key, Counter())[answer] += 1
    pools = {pool: [accession for accession in sequences if accession in inside] for pool, inside in members.items()}
    plans = [(next(pool for pool in _pools_of(row["type"]) if pool in pools), row) for row in questions]
    wanted: dict[Pool, set[str]] = {}
    for pool, row in plans:
        wanted.setdefault(pool, set()).add(row["sequence"])
    queries = sorted({row["sequence"] for row in questions})
    nearest = _nearest(queries, pools, wanted, sequences, threshold) if queries else {}
    retrieved = []
    for pool, row in plans:
        key, found = question_key(row["question"]), nearest[row["sequence"], pool]
        neighbour = pools[pool][found.reference] if found.reference is not None else None
        identity = found.identity if found.reference is not None else None
        if neighbour is not None and (pool, neighbour, key) in asked:
            answer, source = asked[pool, neighbour, key], NEIGHBOUR
        elif neighbour is not None and not is_closed(row["type"]):
            answer, source = first_answer[pool, neighbour], NEIGHBOUR
        elif (pool, key) in votes:
            answer, source = votes[pool, key].most_common(1)[0][0], QUESTION_MAJORITY
        else:
            answer, source = votes[pool, None].most_common(1)[0][0], POOL_MAJORITY
        retrieved.append(Retrieved(answer, source, neighbour, identity))
    return retrieved


def neighbour_summary(retrieved: Sequence[Retrieved]) -> dict[str, Any]:
    """The nearest-neighbour identities the answers relied on: their median and the fraction at or above
    `HOMOLOGUE_IDENTITY` (over the questions with a neighbour), and how many answers each source gave."""
    identities = [found.identity for found in retrieved if found.identity is not None]
    return {
        "questions": len(retrieved),
        "with_neighbour": len(identities),
        "median_identity": statistics.median(identities) if identities else None,
        "fraction_at_least_50": sum(i >= HOMOLOGUE_IDENTITY for i in identities) / len(identities)
        if identities
        else None,
        "answers_by_source": dict(Counter(found.source for found in retrieved)),
    }


def write_neighbours(
    questions: Sequence[dict[str, Any]], retrieved: Sequence[Retrieved], folder: Path, threshold: float
) -> dict[str, Any]:
    """`retrieval.json` in an evaluation's benchmark `folder` (the summary, the threshold and each question's neighbour)
    and the summary appended to its `metrics.md`, so that the table is read with how near the neighbours were."""
    summary = neighbour_summary(retrieved)
    neighbours = [
        {"accession": row["accession"], "type": row["type"], "question": row["question"], **asdict(found)}
        for row, found in zip(questions, retrieved, strict=True)
    ]
    record = {"summary": summary, "threshold": threshold, "neighbours": neighbours}
    (folder / "retrieval.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    with (folder / "metrics.md").open("a", encoding="utf-8") as report:
        report.write("\n" + summary_markdown(summary))
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """`neighbour_summary` as a report section."""
    median, homologues = summary["median_identity"], summary["fraction_at_least_50"]
    sources = ", ".join(f"{source}: {count}" for source, count in summary["answers_by_source"].items())
    return "\n".join(
        [
            "## Retrieval neighbours",
            "",
            f"`{RETRIEVAL}`: the nearest training protein to each question's protein among those asked a question of "
            "its type (of its kind, yes/no or open-ended, for a type training lacks), by sequence identity.",
            "",
            "| questions | with a neighbour | median identity | at >= 50% identity | answers by source |",
            "|---|---|---|---|---|",
            f"| {summary['questions']} | {summary['with_neighbour']} | "
            f"{'-' if median is None else f'{median:.1%}'} | {'-' if homologues is None else f'{homologues:.1%}'} | "
            f"{sources} |",
            "",
        ]
    )


__all__ = [
    "RETRIEVAL",
    "RETRIEVAL_THRESHOLD",
    "Retrieved",
    "neighbour_summary",
    "question_key",
    "retrieve_answers",
    "summary_markdown",
    "write_neighbours",
]
