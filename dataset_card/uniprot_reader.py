"""Streaming readers of UniProtKB entries (flat file, XML, REST JSON) into one plain `UniProtEntry` record.

Every format ends in the same dataclass so that instruction generation never needs to know where an entry came from.
Unreadable entries are skipped *and recorded* in a `ReadReport`: a corpus build must never die on one bad record,
nor lose one without saying so.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from Bio import SeqIO, SwissProt

FLAT_SUFFIXES = {".dat", ".txt", ".txl", ".sp"}
XML_SUFFIXES = {".xml"}
JSON_SUFFIXES = {".json"}

_EVIDENCE = re.compile(r"\s*+\{ECO:[^}]*\}")  # possessive (as below): no backtracking, same matches
_CITATION = re.compile(r"\s*+\((?:PubMed|Ref\.|By similarity|Probable|Potential)[^()]*\)")
_ISOFORM_PREFIX = re.compile(r"^\[[^\]]*\]:\s*")
_ACCESSION_LINE = re.compile(r"^AC   (\w+)", re.MULTILINE)
_EC = re.compile(r"EC=([\d.n-]+)")
_PTM_FEATURES = {"MOD_RES", "CARBOHYD", "LIPID", "CROSSLNK"}
_XML_PTM_FEATURES = {"modified residue", "glycosylation site", "lipid moiety-binding region", "cross-link"}
_JSON_PTM_FEATURES = {"Modified residue", "Glycosylation", "Lipidation", "Cross-link"}
_GO_FIELDS = {"F": "go_molecular_function", "P": "go_biological_process", "C": "go_cellular_component"}
_LEADING_BLANK_LINES = re.compile(r"(?:[^\S\n]*\n)*")
# Flat-file lines Biopython parses but `entry_from_swissprot` never reads: references, non-GO cross-references, and
# lines Biopython ignores anyway (`**`, CC lines that neither start nor continue a comment: the copyright box).
# A match is a run of such lines, each with the newline *before* it, so a record's first (ID) line is never dropped.
_UNREAD_LINE = r"\n(?:R[NPCXGATL]|\*\*|DR(?![^\n]{3}GO)|CC(?![^\n]{3}(?:-!-|   )))[^\n]*"
_UNREAD_LINES = re.compile(f"{_UNREAD_LINE}(?:{_UNREAD_LINE})*")
# One feature (FT line with a name in columns 6-13, then its continuation lines) or comment ('CC   -!- ' line, then
# 'CC       ' lines); a block may also open with continuation lines, which Biopython adds to the last one started.
_FT_START = r"[^\n]{3}[^\S\n]{0,7}+\S"  # possessive: no backtracking over the blanks
_FT_CC_BLOCK = re.compile(
    rf"\n(?:FT(?:(?P<feature>{_FT_START})|)[^\n]*(?:\nFT(?!{_FT_START})[^\n]*)*"
    r"|CC[^\n]{3}(?P<comment>-!-)?[^\n]*(?:\nCC[^\n]{3}   [^\n]*)*)"
)
# Feature types and comment topics read by `entry_from_swissprot`: keep in step with it.
_FLAT_FEATURES = {"DOMAIN", "MOTIF", *_PTM_FEATURES}
_FLAT_TOPICS = {
    "FUNCTION",
    "CATALYTIC ACTIVITY",
    "COFACTOR",
    "PATHWAY",
    "SUBCELLULAR LOCATION",
    "SIMILARITY",
    "DOMAIN",
    "PTM",
    "TISSUE SPECIFICITY",
}
_FLAT_CHUNK_CHARS = 1 << 20  # text read from a flat file at a time
_BATCH_CHARS = 1 << 22  # record text per task sent to a worker process
_IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: keeps workers busy, bounds memory
_TRUNCATED = "truncated record: no '//' terminator before end of file"


def clean_text(text: str) -> str:
    """Drop evidence tags and citations, collapse whitespace, drop final periods: answers must read as plain prose.

    The substring checks skip regex scans that cannot match (most GO terms and keywords carry neither), and
    `str.split()` splits on exactly the characters `\\s` matches: same result as the plain regex chain, faster.
    """
    if "{ECO:" in text:
        text = _EVIDENCE.sub("", text)
    if "(" in text:
        text = _CITATION.sub("", text)
    return " ".join(text.split()).rstrip(". ")


def _unique(items: Iterable[str]) -> list[str]:
    """Cleaned, non-empty, de-duplicated items in first-seen order (repeated MOD_RES notes carry no information)."""
    seen: dict[str, None] = {}
    for item in items:
        cleaned = clean_text(item)
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)


@dataclass
class UniProtEntry:
    """The fields of one UniProtKB entry that SEPIT turns into captions and questions; lists are empty when absent."""

    accession: str
    name: str
    protein_name: str
    organism: str
    sequence: str
    function: list[str] = field(default_factory=list)
    catalytic_activity: list[str] = field(default_factory=list)
    ec_numbers: list[str] = field(default_factory=list)
    cofactor: list[str] = field(default_factory=list)
    pathway: list[str] = field(default_factory=list)
    subcellular_location: list[str] = field(default_factory=list)
    similarity: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    motifs: list[str] = field(default_factory=list)
    ptm: list[str] = field(default_factory=list)
    tissue_specificity: list[str] = field(default_factory=list)
    go_molecular_function: list[str] = field(default_factory=list)
    go_biological_process: list[str] = field(default_factory=list)
    go_cellular_component: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadProblem:
    """One entry (or the rest of a file) that could not be read, with where and why."""

    file: str
    entry: str
    reason: str


@dataclass
class ReadReport:
    """Counts of entries read / skipped per file and the problems behind every skip."""

    read: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[ReadProblem] = field(default_factory=list)

    def skip(self, file: str, entry: str, reason: str) -> None:
        """Record one unreadable entry."""
        self.skipped[file] += 1
        self.problems.append(ReadProblem(file, entry, reason))

    @property
    def total_read(self) -> int:
        return sum(self.read.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# ----------------------------------------------------------------------------------------------------------------
# format detection and opening


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _open_binary(path: Path) -> IO[bytes]:
    """Biopython's XML parser insists on bytes (it lets the XML declaration pick the encoding)."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def detect_format(path: Path) -> str | None:
    """'flat', 'xml' or 'json' from the suffix (ignoring .gz), else by sniffing the first bytes; None if neither."""
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    if suffix in FLAT_SUFFIXES:
        return "flat"
    if suffix in XML_SUFFIXES:
        return "xml"
    if suffix in JSON_SUFFIXES:
        return "json"
    with _open_text(path) as handle:
        head = handle.read(256).lstrip()
    if head.startswith("ID   "):
        return "flat"
    if head.startswith(("<?xml", "<uniprot")):
        return "xml"
    if head.startswith("{"):
        return "json"
    return None


def _files(path: Path) -> list[Path]:
    """A file, or a folder's readable files (sorted, so corpus order and seeded sampling are stable)."""
    if path.is_file():
        return [path]
    return [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() != ".md"]


# ----------------------------------------------------------------------------------------------------------------
# flat files


def _cut_records(text: str) -> Iterator[tuple[str, bool]]:
    """Complete records of `text` (which starts at a line start); returns the unfinished rest."""
    start = 0
    while True:
        if text.startswith("//", start):
            cut = start
        elif (cut := text.find("\n//", start)) >= 0:
            cut += 1
        else:
            return text[start:]
        end = text.find("\n", cut)
        if end < 0:
            return text[start:]
        yield text[_LEADING_BLANK_LINES.match(text, start).end() : cut] + "//\n", True
        start = end + 1


def split_flat_records(chunks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Records of a flat-file stream cut at `//` lines, with whether the terminator was seen (a truncated tail).

    `chunks` are consecutive pieces of the text: lines, or (much faster: cuts are found by `str.find`, not by a Python
    step per line) large blocks. Blank lines before a record are dropped and its terminator line becomes `//`.
    """
    rest = ""
    for chunk in chunks:
        rest = yield from _cut_records(rest + chunk)
    if rest and not rest.endswith("\n"):
        rest = yield from _cut_records(rest + "\n")
    rest = rest[_LEADING_BLANK_LINES.match(rest).end() :]
    if rest:
        yield rest, False


def _flat_comments(record: SwissProt.Record) -> dict[str, list[str]]:
    topics: dict[str, list[str]] = {}
    for comment in record.comments:
        topic, _, text = comment.partition(":")
        topics.setdefault(topic.strip(), []).append(text.strip())
    return topics


def _recommended_name(description: str) -> str:
    """'RecName: Full=X {ECO..};' (or SubName for TrEMBL) -> 'X'."""
    for tag in ("RecName:", "SubName:"):
        if tag in description:
            part = description.split(tag, 1)[1]
            match = re.search(r"Full=([^;]*)", part)
            if match:
                return clean_text(match.group(1))
    return ""


def _catalytic(texts: list[str]) -> tuple[list[str], list[str]]:
    """Reaction text and EC numbers of CATALYTIC ACTIVITY comments (new 'Reaction=...; EC=...;' and old free text)."""
    reactions, ecs = [], []
    for text in texts:
        ecs.extend(_EC.findall(text))
        match = re.search(r"Reaction=(.*?);\s*(?:Xref=|EC=|Evidence=|$)", text)
        reactions.append(match.group(1) if match else text)
    return reactions, ecs


def _cofactors(texts: list[str]) -> list[str]:
    """Cofactor names and notes of COFACTOR comments ('Name=Zn(2+); Xref=...; Note=...')."""
    items = []
    for text in texts:
        names = re.findall(r"Name=([^;]*);", text)
        note = re.search(r"Note=(.*)$", text)
        items.extend(names)
        if note:
            items.append(note.group(1).rstrip(";"))
        if not names and not note:
            items.append(text)
    return items


def _locations(texts: list[str]) -> list[str]:
    """Location names of SUBCELLULAR LOCATION comments: 'Cytoplasm {..}. Membrane; Multi-pass .... Note=..'."""
    items = []
    for text in texts:
        body = _ISOFORM_PREFIX.sub("", clean_text(text)).split("Note=", 1)[0]
        for sentence in body.split(". "):
            location = sentence.split(";", 1)[0]
            items.append(location)
    return items


def _feature_notes(record: SwissProt.Record, types: set[str]) -> list[str]:
    return [f.qualifiers.get("note", "") for f in record.features if f.type in types]


def entry_from_swissprot(record: SwissProt.Record) -> UniProtEntry:
    """Map a Biopython SwissProt record onto the common entry."""
    comments = _flat_comments(record)
    reactions, reaction_ecs = _catalytic(comments.get("CATALYTIC ACTIVITY", []))
    go: dict[str, list[str]] = {name: [] for name in _GO_FIELDS.values()}
    for reference in record.cross_references:
        if reference[0] == "GO" and len(reference) > 2 and reference[2][:2] in ("F:", "P:", "C:"):
            go[_GO_FIELDS[reference[2][0]]].append(reference[2][2:])
    return UniProtEntry(
        accession=record.accessions[0],
        name=record.entry_name,
        protein_name=_recommended_name(record.description),
        organism=record.organism.rstrip("."),
        sequence=record.sequence,
        function=_unique(comments.get("FUNCTION", [])),
        catalytic_activity=_unique(reactions),
        ec_numbers=_unique(_EC.findall(record.description) + reaction_ecs),
        cofactor=_unique(_cofactors(comments.get("COFACTOR", []))),
        pathway=_unique(comments.get("PATHWAY", [])),
        subcellular_location=_unique(_locations(comments.get("SUBCELLULAR LOCATION", []))),
        similarity=_unique(comments.get("SIMILARITY", [])),
        domains=_unique(_feature_notes(record, {"DOMAIN"}) + comments.get("DOMAIN", [])),
        motifs=_unique(_feature_notes(record, {"MOTIF"})),
        ptm=_unique(comments.get("PTM", []) + _feature_notes(record, _PTM_FEATURES)),
        tissue_specificity=_unique(comments.get("TISSUE SPECIFICITY", [])),
        keywords=_unique(_EVIDENCE.sub("", "; ".join(record.keywords)).split(";")),
        **{name: _unique(values) for name, values in go.items()},
    )


class _FeatureAndCommentFilter:
    """`re.sub` callback keeping the features and comments `entry_from_swissprot` reads, by Biopython's own rules.

    Biopython adds a continuation line to the last feature (comment) started, even past other lines, so continuation
    lines share the fate of that one; before any start, they are kept (Biopython rejects or keeps them as they are).
    A comment whose first line names no topic is kept: its topic is only known once its lines are joined.
    """

    def __init__(self) -> None:
        self.feature = True
        self.comment = True

    def __call__(self, block: re.Match[str]) -> str:
        text = block.group()
        if text[1] == "F":
            if block.group("feature"):
                self.feature = text[6:14].rstrip() in _FLAT_FEATURES
            return text if self.feature else ""
        if block.group("comment"):
            topic, colon, _ = text[10:].partition("\n")[0].partition(":")
            self.comment = not colon or topic.strip() in _FLAT_TOPICS
        return text if self.comment else ""


def drop_unread_lines(text: str) -> str:
    """A terminated record without the lines the entry never uses: Biopython parses what is left about 6x faster.

    Dropped: references (RN..RL), DR lines other than GO, `**` lines, the CC copyright box, features of other types
    and comments of other topics. Every other line (unknown ones too, which make Biopython reject the record) is
    passed on unchanged, so the parsed entry is the same; only a defect confined to a dropped line no longer makes a
    record unreadable.
    """
    return _FT_CC_BLOCK.sub(_FeatureAndCommentFilter(), _UNREAD_LINES.sub("", text))


def _parse_flat_record(text: str, terminated: bool) -> UniProtEntry | str:
    """The entry of one record, or why it is unreadable (a string, so results pickle back from workers as is)."""
    if not terminated:
        return _TRUNCATED
    try:
        return entry_from_swissprot(SwissProt.read(io.StringIO(drop_unread_lines(text))))
    except Exception as error:  # noqa: BLE001 - any parser failure skips only this record
        return f"{type(error).__name__}: {error}"


def _parse_flat_batch(records: list[tuple[str, bool]]) -> list[UniProtEntry | str]:
    """Worker task: one batch of records, so that each round trip to a process carries megabytes, not one entry."""
    return [_parse_flat_record(text, terminated) for text, terminated in records]


def _batches(records: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record[0])
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _parse_flat_records(
    records: Iterable[tuple[str, bool]], pool: Executor | None, in_flight: int
) -> Iterator[tuple[str, UniProtEntry | str]]:
    """(record text, entry or problem) in input order; with a pool, at most `in_flight` batches wait at any time."""
    if pool is None:
        for text, terminated in records:
            yield text, _parse_flat_record(text, terminated)
        return
    pending: deque[tuple[list[tuple[str, bool]], Future[list[UniProtEntry | str]]]] = deque()
    for batch in _batches(records):
        pending.append((batch, pool.submit(_parse_flat_batch, batch)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield from zip((text for text, _ in done), future.result(), strict=True)
    for done, future in pending:
        yield from zip((text for text, _ in done), future.result(), strict=True)


def _read_flat(path: Path, report: ReadReport, pool: Executor | None, in_flight: int) -> Iterator[UniProtEntry]:
    with _open_text(path) as handle:
        records = split_flat_records(iter(partial(handle.read, _FLAT_CHUNK_CHARS), ""))
        for index, (text, result) in enumerate(_parse_flat_records(records, pool, in_flight)):
            if isinstance(result, str):
                accession = _ACCESSION_LINE.search(text)
                report.skip(str(path), accession.group(1) if accession else f"entry #{index}", result)
                continue
            report.read[str(path)] += 1
            yield result


# ----------------------------------------------------------------------------------------------------------------
# UniProt XML


def _xml_list(annotations: dict[str, Any], key: str) -> list[str]:
    """An XML annotation as a list of strings (Biopython stores some as str, some as lists holding None)."""
    value = annotations.get(key, [])
    values = [value] if isinstance(value, str) else value
    return [item for item in values if isinstance(item, str)]


def entry_from_seqrecord(record: Any) -> UniProtEntry:
    """Map a Biopython 'uniprot-xml' SeqRecord onto the common entry.

    Biopython keeps only GO identifiers (no term names) from XML, so the GO lists stay empty for this format.
    """
    notes = record.annotations

    def features(kinds: set[str]) -> list[str]:
        return [f.qualifiers.get("description", "") for f in record.features if f.type in kinds]

    accessions = _xml_list(notes, "accessions")
    names = _xml_list(notes, "recommendedName_fullName") or _xml_list(notes, "submittedName_fullName")
    return UniProtEntry(
        accession=accessions[0] if accessions else record.id,
        name=record.name,
        protein_name=clean_text(names[0]) if names else "",
        organism=str(notes.get("organism", "")),
        sequence=str(record.seq),
        function=_unique(_xml_list(notes, "comment_function")),
        catalytic_activity=_unique(_xml_list(notes, "comment_catalyticactivity")),
        ec_numbers=_unique(_xml_list(notes, "recommendedName_ecNumber")),
        cofactor=_unique(_xml_list(notes, "comment_cofactor")),
        pathway=_unique(_xml_list(notes, "comment_pathway")),
        subcellular_location=_unique(_xml_list(notes, "comment_subcellularlocation_location")),
        similarity=_unique(_xml_list(notes, "comment_similarity")),
        domains=_unique(features({"domain"}) + _xml_list(notes, "comment_domain")),
        motifs=_unique(features({"short sequence motif"})),
        ptm=_unique(_xml_list(notes, "comment_PTM") + features(_XML_PTM_FEATURES)),
        tissue_specificity=_unique(_xml_list(notes, "comment_tissuespecificity")),
        keywords=_unique(_xml_list(notes, "keywords")),
    )


def _read_xml(path: Path, report: ReadReport) -> Iterator[UniProtEntry]:
    """XML entries one by one; Biopython cannot resume after a broken element, so the rest of the file is reported."""
    with _open_binary(path) as handle:
        records = SeqIO.parse(handle, "uniprot-xml")
        index = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - a broken element ends this file, reported
                report.skip(str(path), f"entry #{index} and rest of file", f"{type(error).__name__}: {error}")
                return
            try:
                entry = entry_from_seqrecord(record)
            except Exception as error:  # noqa: BLE001 - a record missing required parts skips only itself
                report.skip(str(path), record.id or f"entry #{index}", f"{type(error).__name__}: {error}")
            else:
                report.read[str(path)] += 1
                yield entry
            index += 1


# ----------------------------------------------------------------------------------------------------------------
# UniProt REST JSON


def _texts(comment: dict[str, Any]) -> list[str]:
    return [text.get("value", "") for text in comment.get("texts", [])]


def entry_from_json(result: dict[str, Any]) -> UniProtEntry:
    """Map one element of a UniProt REST `results` array onto the common entry."""
    comments: dict[str, list[dict[str, Any]]] = {}
    for comment in result.get("comments", []):
        comments.setdefault(comment.get("commentType", ""), []).append(comment)

    def texts(kind: str) -> list[str]:
        return [text for comment in comments.get(kind, []) for text in _texts(comment)]

    def features(kinds: set[str]) -> list[str]:
        return [f.get("description", "") for f in result.get("features", []) if f.get("type") in kinds]

    description = result.get("proteinDescription", {})
    named = description.get("recommendedName") or next(iter(description.get("submissionNames", [])), {})
    reactions = [c.get("reaction", {}) for c in comments.get("CATALYTIC ACTIVITY", [])]
    cofactors = [
        item
        for c in comments.get("COFACTOR", [])
        for item in [co.get("name", "") for co in c.get("cofactors", [])] + _texts(c.get("note", {}))
    ]
    locations = [
        loc.get("location", {}).get("value", "")
        for c in comments.get("SUBCELLULAR LOCATION", [])
        for loc in c.get("subcellularLocations", [])
    ]
    go: dict[str, list[str]] = {name: [] for name in _GO_FIELDS.values()}
    for reference in result.get("uniProtKBCrossReferences", []):
        if reference.get("database") != "GO":
            continue
        for prop in reference.get("properties", []):
            term = prop.get("value", "")
            if prop.get("key") == "GoTerm" and term[:2] in ("F:", "P:", "C:"):
                go[_GO_FIELDS[term[0]]].append(term[2:])
    organism = result.get("organism", {})
    organism_name = organism.get("scientificName", "")
    if organism.get("commonName"):
        organism_name += f" ({organism['commonName']})"
    return UniProtEntry(
        accession=result["primaryAccession"],
        name=result.get("uniProtkbId", ""),
        protein_name=clean_text(named.get("fullName", {}).get("value", "")),
        organism=organism_name,
        sequence=result.get("sequence", {}).get("value", ""),
        function=_unique(texts("FUNCTION")),
        catalytic_activity=_unique(r.get("name", "") for r in reactions),
        ec_numbers=_unique(
            [ec.get("value", "") for ec in named.get("ecNumbers", [])] + [r.get("ecNumber", "") for r in reactions]
        ),
        cofactor=_unique(cofactors),
        pathway=_unique(texts("PATHWAY")),
        subcellular_location=_unique(locations),
        similarity=_unique(texts("SIMILARITY")),
        domains=_unique(features({"Domain"}) + texts("DOMAIN")),
        motifs=_unique(features({"Motif"})),
        ptm=_unique(texts("PTM") + features(_JSON_PTM_FEATURES)),
        tissue_specificity=_unique(texts("TISSUE SPECIFICITY")),
        keywords=_unique(k.get("name", "") for k in result.get("keywords", [])),
        **{name: _unique(values) for name, values in go.items()},
    )


def _read_json(path: Path, report: ReadReport) -> Iterator[UniProtEntry]:
    """A REST response is one JSON document, so it is loaded per file; each result is mapped on its own."""
    try:
        with _open_text(path) as handle:
            results = json.load(handle)["results"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.skip(str(path), "whole file", f"{type(error).__name__}: {error}")
        return
    for index, result in enumerate(results):
        try:
            entry = entry_from_json(result)
        except Exception as error:  # noqa: BLE001 - one malformed result skips only itself
            where = result.get("primaryAccession", f"entry #{index}") if isinstance(result, dict) else f"#{index}"
            report.skip(str(path), where, f"{type(error).__name__}: {error}")
            continue
        report.read[str(path)] += 1
        yield entry


def iter_entries(path: str | Path, report: ReadReport | None = None, workers: int = 1) -> Iterator[UniProtEntry]:
    """Entries of a UniProtKB file (flat/XML/JSON, optionally gzipped) or of every such file in a folder.

    Problems go to `report` (pass one in to see them); a file of unknown format is reported, not guessed at.
    `workers` > 1 parses flat-file records in that many processes (Biopython parsing is CPU-bound); entries and
    report are the same as with one, in the same order. XML and JSON are always read in this process. Workers are
    started with "spawn", so a calling script needs the usual `if __name__ == "__main__":` guard.
    """
    report = report if report is not None else ReadReport()
    if not Path(path).exists():
        raise ValueError(f"uniprot: {path} does not exist; give UniProtKB files or folders")
    # spawn, not fork: safe in callers that run threads (progress bars, tokenizers), same on every OS
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        for file in _files(Path(path)):
            try:
                kind = detect_format(file)
            except (OSError, UnicodeDecodeError) as error:
                report.skip(str(file), "whole file", f"{type(error).__name__}: {error}")
                continue
            try:
                if kind == "flat":
                    yield from _read_flat(file, report, pool, _IN_FLIGHT_PER_WORKER * workers)
                elif kind == "xml":
                    yield from _read_xml(file, report)
                elif kind == "json":
                    yield from _read_json(file, report)
                else:
                    report.skip(str(file), "whole file", "unknown format: not UniProt flat, XML or JSON")
            except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as error:
                # binary content or a corrupt gzip stream: what was read stays, the rest of this file is reported
                report.skip(
                    str(file), "rest of file", f"{type(error).__name__}: {error} (not UTF-8 text or corrupt gzip)"
                )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
