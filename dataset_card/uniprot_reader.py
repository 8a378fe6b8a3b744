"""Streaming readers of UniProtKB entries (flat file, XML, REST JSON) into one plain `UniProtEntry` record.

Every format ends in the same dataclass so that instruction generation never needs to know where an entry came from.
Unreadable entries are skipped *and recorded* in a `ReadReport`: a corpus build must never die on one bad record,
nor lose one without saying so. A reason names the field at fault (`primaryAccession`, `comments[2].texts[0].value`,
`feature (domain)`), so a bad entry can be found and fixed.

Parts of an entry that SEPIT never reads (references, gene names, dates, taxonomy, most cross-references) are dropped
before the libraries parse it: formats from the 1990s to today differ most in those parts (pre-2003 `GN   A OR B.`
lines, old `DT` forms), and a defect there must not cost the entry.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any
from xml.etree import ElementTree

from Bio import SwissProt
from Bio.SeqIO.UniprotIO import NS, UniprotIterator

from modeling_sepit.configuration_sepit import PROTEIN_TOKEN
from modeling_sepit.structure_loading import check_sequence, file_kind

FLAT_SUFFIXES = {".dat", ".txt", ".txl", ".sp"}
XML_SUFFIXES = {".xml"}
JSON_SUFFIXES = {".json"}

_EVIDENCE = re.compile(r"\s*+\{ECO:[^}]*\}")  # possessive (as below): no backtracking, same matches
_CITATION = re.compile(r"\s*+\((?:PubMed|Ref\.|By similarity|Probable|Potential)[^()]*\)")
_ISOFORM_PREFIX = re.compile(r"^\[[^\]]*\]:\s*")
_ACCESSION_LINE = re.compile(r"^AC   (\w+)", re.MULTILINE)
_EC = re.compile(r"EC[= ](\d+\.[\d.n-]+)")  # 'EC=1.2.3.4' and the pre-2008 '(EC 1.2.3.4)' of DE lines
_PTM_FEATURES = {"MOD_RES", "CARBOHYD", "LIPID", "CROSSLNK"}
_XML_PTM_FEATURES = {"modified residue", "glycosylation site", "lipid moiety-binding region", "cross-link"}
_JSON_PTM_FEATURES = {"Modified residue", "Glycosylation", "Lipidation", "Cross-link"}
_GO_FIELDS = {"F": "go_molecular_function", "P": "go_biological_process", "C": "go_cellular_component"}
_LEADING_BLANK_LINES = re.compile(r"(?:[^\S\n]*\n)*")
# Flat-file lines Biopython parses but `entry_from_swissprot` never reads: references, non-GO cross-references, gene
# names (pre-2003 `GN   ABCD1 OR ALD.` lines fail Biopython's GN parser), dates (`DT`, in several historic forms),
# taxonomy and host lines (`OG`, `OC`, `OX`, `OH`), `PE`, the `SQ` summary (the sequence lines themselves stay), and
# lines Biopython ignores anyway (`**`, CC lines that neither start nor continue a comment: the copyright box).
# A match is a run of such lines, each with the newline *before* it, so a record's first (ID) line is never dropped.
_UNREAD_LINE = r"\n(?:R[NPCXGATL]|GN|DT|O[GCXH]|PE|SQ|\*\*|DR(?![^\n]{3}GO)|CC(?![^\n]{3}(?:-!-|   )))[^\n]*"
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
_ACCESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # UniProt, isoform (P12345-2) and IPI (IPI00383150) forms
_OLD_NAME_END = re.compile(r"\s+[(\[]|\.$")  # pre-2008 DE: 'Name (Synonym) (EC 1.2.3.4) [Includes: ...].'
_XML_READ_COMMENTS = {
    "function",
    "catalytic activity",
    "cofactor",
    "pathway",
    "subcellular location",
    "similarity",
    "domain",
    "PTM",
    "tissue specificity",
}
_XML_READ_ELEMENTS = {"accession", "name", "protein", "organism", "keyword", "feature", "sequence"}


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


def checked_entry(entry: UniProtEntry) -> UniProtEntry:
    """`entry` if every field can go into the dataset; else a ValueError naming the field: an accession that is empty
    or not one word, a sequence of other than amino-acid letters, or text holding the model's `<protein>` placeholder
    (each answer would then carry an extra protein slot, and training fail on its batch)."""
    if not isinstance(entry.accession, str) or not _ACCESSION.fullmatch(entry.accession):
        raise ValueError(f"accession: {entry.accession!r} is not an accession (letters, digits, '_', '.', '-')")
    check_sequence(entry.sequence, "sequence")
    for name, value in vars(entry).items():
        for text in value if isinstance(value, list) else [value]:
            if PROTEIN_TOKEN in text:
                raise ValueError(f"{name}: holds {PROTEIN_TOKEN!r}, the model's protein placeholder: {text[:80]!r}")
    return entry


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


def _files(path: Path, report: ReadReport, seen: set[str] | None = None) -> Iterator[Path]:
    """A file, or a folder's files, sub-folders included (sorted, so corpus order and seeded sampling are stable).

    Documentation (`.md`) and hidden files and folders are not data and are passed over; anything else that cannot be
    read as a file is reported: a broken link, a link loop, a named pipe or device (reading one would block or never
    end), a folder that cannot be listed. A folder reached twice through links is read once.
    """
    kind = file_kind(path)
    if kind == "file":
        yield path
        return
    if kind != "folder":
        report.skip(str(path), "whole file", kind)
        return
    seen = set() if seen is None else seen
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.add(real)
    try:
        children = sorted(path.iterdir())
    except OSError as error:
        report.skip(str(path), "whole folder", f"cannot list the folder ({error.strerror or error})")
        return
    for child in children:
        if not child.name.startswith(".") and child.suffix.lower() != ".md":
            yield from _files(child, report, seen)


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
    """'RecName: Full=X {ECO..};' (or SubName for TrEMBL) -> 'X'; a pre-2008 description ('X (Synonym) (EC ...).',
    no tags) -> 'X'."""
    for tag in ("RecName:", "SubName:"):
        if tag in description:
            part = description.split(tag, 1)[1]
            match = re.search(r"Full=([^;]*)", part)
            if match:
                return clean_text(match.group(1))
    if "Full=" in description:
        return ""
    return clean_text(_OLD_NAME_END.split(description, 1)[0])


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


class _LineTracker(io.StringIO):
    """A record's text that remembers the last line Biopython took: the line its parser failed on, for the report."""

    last = ""

    def __next__(self) -> str:
        self.last = super().__next__()
        return self.last


def _line_name(line: str) -> str:
    """'FT line "FT   DOMAIN ..."', 'sequence line', ...: where in a record a parser failed."""
    key, shown = line[:2], repr(line.rstrip()[:50])
    if key == "  ":
        return "sequence line"
    return f"{key} line {shown}" if re.fullmatch(r"[A-Z*/]{2}", key) else f"line {shown}"


def _parse_flat_record(text: str, terminated: bool) -> UniProtEntry | str:
    """The entry of one record, or why it is unreadable, naming the line (a string, so results pickle back from
    workers as is)."""
    if not terminated:
        return _TRUNCATED
    kept = drop_unread_lines(text)
    try:
        record = SwissProt.read(io.StringIO(kept))
    except Exception as error:  # noqa: BLE001 - any parser failure skips only this record
        handle = _LineTracker(kept)  # read again, rarely, to name the line: tracking every line costs time
        with suppress(Exception):  # the same failure, now with its line
            SwissProt.read(handle)
        return f"{_line_name(handle.last)}: {type(error).__name__}: {error}"
    try:
        return checked_entry(entry_from_swissprot(record))
    except Exception as error:  # noqa: BLE001 - a field SEPIT cannot use skips only this record
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
    """Map a Biopython 'uniprot-xml' SeqRecord onto the common entry; GO terms come from the `go_terms` annotation
    that `UniProtXmlIterator` adds (Biopython itself keeps only the GO identifiers)."""
    notes = record.annotations
    go: dict[str, list[str]] = {name: [] for name in _GO_FIELDS.values()}
    for term in _xml_list(notes, "go_terms"):
        if term[:2] in ("F:", "P:", "C:"):
            go[_GO_FIELDS[term[0]]].append(term[2:])

    def features(kinds: set[str]) -> list[str]:
        return [f.qualifiers.get("description", "") for f in record.features if f.type in kinds]

    accessions = _xml_list(notes, "accessions")
    names = _xml_list(notes, "recommendedName_fullName") or _xml_list(notes, "submittedName_fullName")
    return UniProtEntry(
        accession=accessions[0] if accessions else record.id,
        name=record.name,
        protein_name=clean_text(names[0]) if names else "",
        organism=str(notes.get("organism", "")),
        sequence=str(record.seq) if record.seq is not None else "",  # no <sequence> element: no sequence
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
        **{name: _unique(values) for name, values in go.items()},
    )


class _XmlEntryError(Exception):
    """One XML entry that Biopython could not map; the XML around it is intact, so reading goes on."""

    def __init__(self, accession: str, reason: str):
        super().__init__(reason)
        self.accession = accession


def _xml_name(element: ElementTree.Element) -> str:
    """'feature (domain)': an element's tag and, when it has one, its type."""
    tag = element.tag.removeprefix(NS)
    return f"{tag} ({element.get('type')})" if element.get("type") else tag


class UniProtXmlIterator(UniprotIterator):
    """Biopython's UniProt XML reader on the parts of an entry SEPIT reads, keeping the GO term names too.

    Elements SEPIT never reads (references, evidence, gene names, comments of other topics, cross-references other
    than GO) are removed before Biopython maps the entry, as for the flat files' lines. An entry Biopython cannot map
    raises `_XmlEntryError` naming the element at fault; the iterator then goes on with the next entry.
    """

    def _create_record(self, entry: ElementTree.Element) -> Any:
        terms = []
        for element in list(entry):
            tag = element.tag.removeprefix(NS)
            if tag == "dbReference" and element.get("type") == "GO":
                terms += [p.get("value", "") for p in element.iterfind(f"{NS}property") if p.get("type") == "term"]
            elif tag == "comment" and element.get("type") in _XML_READ_COMMENTS:
                continue
            if tag not in _XML_READ_ELEMENTS:
                entry.remove(element)
        accessions = [element.text for element in entry.iterfind(f"{NS}accession")]
        if not accessions or not all(accessions):
            raise _XmlEntryError("entry without accession", "accession: missing or empty")
        accession = accessions[0]
        try:
            record = super()._create_record(entry)
        except Exception as error:  # noqa: BLE001 - named by the element that fails alone, below
            raise _XmlEntryError(accession, f"{self._culprit(entry)}: {type(error).__name__}: {error}") from error
        record.annotations["go_terms"] = terms
        return record

    def _culprit(self, entry: ElementTree.Element) -> str:
        """The first child element that Biopython fails to map on its own (with the accessions it needs)."""
        for element in entry:
            alone = ElementTree.Element(entry.tag, entry.attrib)
            alone.extend(e for e in entry.iterfind(f"{NS}accession") if e is not element)
            alone.append(element)
            try:
                super()._create_record(alone)
            except Exception:  # noqa: BLE001 - this is the element that fails
                return _xml_name(element)
        return "entry"


def _read_xml(path: Path, report: ReadReport) -> Iterator[UniProtEntry]:
    """XML entries one by one. An entry Biopython cannot map is reported and skipped; broken XML (a parse error) ends
    the file, as no parser can find the next entry in it, and the rest of the file is reported."""
    with _open_binary(path) as handle:
        records = UniProtXmlIterator(handle)
        index = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except _XmlEntryError as error:
                report.skip(str(path), error.accession, str(error))
                index += 1
                continue
            except Exception as error:  # noqa: BLE001 - broken XML ends this file, reported
                cause = error if str(error) else error.__context__ or error  # Biopython's bare assert on a ParseError
                report.skip(str(path), f"entry #{index} and rest of file", f"{type(cause).__name__}: {cause}")
                return
            try:
                entry = checked_entry(entry_from_seqrecord(record))
            except Exception as error:  # noqa: BLE001 - a record missing required parts skips only itself
                report.skip(str(path), record.id or f"entry #{index}", f"{type(error).__name__}: {error}")
            else:
                report.read[str(path)] += 1
                yield entry
            index += 1


# ----------------------------------------------------------------------------------------------------------------
# UniProt REST JSON

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string"}


def _describe(value: Any) -> str:
    """A JSON value for a message: its type and the start of its text ('int 5', 'an object with keys [...]')."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return f"an object with keys {sorted(map(str, value))[:6]}"
    return f"{type(value).__name__} {value!r:.40}"


def _typed(value: Any, kind: type, where: str) -> Any:
    """`value` when it is of JSON type `kind` (absent or null: an empty one); else a ValueError naming `where`."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ValueError(f"{where}: expected {_JSON_TYPES[kind]}, got {_describe(value)}")
    return value


def _member(parent: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """Member `key` of an object at path `where` ('' at the top, else ending in '.'), checked to be a `kind`."""
    return _typed(parent.get(key), kind, f"{where}{key}")


def _objects(parent: dict[str, Any], key: str, where: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The objects of array member `key`, each with its path ('comments[2].'), so that errors inside name it."""
    for index, item in enumerate(_member(parent, key, list, where)):
        path = f"{where}{key}[{index}]"
        yield _typed(item, dict, path), f"{path}."


def entry_from_json(result: Any) -> UniProtEntry:
    """Map one UniProt REST JSON entry onto the common entry; a member of the wrong JSON type is a ValueError naming
    its path (`comments[2].texts[0].value: expected a string, got int 5`)."""
    result = _typed(result, dict, "entry")
    accession = result.get("primaryAccession")
    if not isinstance(accession, str):
        raise ValueError(f"primaryAccession: expected a string, got {_describe(accession)}")
    comments: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for comment, where in _objects(result, "comments", ""):
        comments.setdefault(_member(comment, "commentType", str, where), []).append((comment, where))

    def texts(kind: str) -> list[str]:
        return [
            _member(text, "value", str, at)
            for comment, where in comments.get(kind, [])
            for text, at in _objects(comment, "texts", where)
        ]

    def features(kinds: set[str]) -> list[str]:
        return [
            _member(feature, "description", str, at)
            for feature, at in _objects(result, "features", "")
            if _member(feature, "type", str, at) in kinds
        ]

    description = _member(result, "proteinDescription", dict, "")
    named, at = _member(description, "recommendedName", dict, "proteinDescription."), "proteinDescription."
    at += "recommendedName."
    if not named:
        named, at = next(_objects(description, "submissionNames", "proteinDescription."), ({}, ""))
    full_name = _member(_member(named, "fullName", dict, at), "value", str, f"{at}fullName.")
    reactions = [
        (_member(comment, "reaction", dict, where), f"{where}reaction.")
        for comment, where in comments.get("CATALYTIC ACTIVITY", [])
    ]
    cofactors, locations = [], []
    for comment, where in comments.get("COFACTOR", []):
        cofactors += [_member(item, "name", str, at) for item, at in _objects(comment, "cofactors", where)]
        note = _member(comment, "note", dict, where)
        cofactors += [_member(text, "value", str, at) for text, at in _objects(note, "texts", f"{where}note.")]
    for comment, where in comments.get("SUBCELLULAR LOCATION", []):
        for item, at in _objects(comment, "subcellularLocations", where):
            locations.append(_member(_member(item, "location", dict, at), "value", str, f"{at}location."))
    go: dict[str, list[str]] = {name: [] for name in _GO_FIELDS.values()}
    for reference, where in _objects(result, "uniProtKBCrossReferences", ""):
        if _member(reference, "database", str, where) != "GO":
            continue
        for prop, at in _objects(reference, "properties", where):
            term = _member(prop, "value", str, at)
            if _member(prop, "key", str, at) == "GoTerm" and term[:2] in ("F:", "P:", "C:"):
                go[_GO_FIELDS[term[0]]].append(term[2:])
    organism = _member(result, "organism", dict, "")
    organism_name = _member(organism, "scientificName", str, "organism.")
    common_name = _member(organism, "commonName", str, "organism.")
    if common_name:
        organism_name += f" ({common_name})"
    ec_numbers = [_member(ec, "value", str, where) for ec, where in _objects(named, "ecNumbers", at)]
    return UniProtEntry(
        accession=accession,
        name=_member(result, "uniProtkbId", str, ""),
        protein_name=clean_text(full_name),
        organism=organism_name,
        sequence=_member(_member(result, "sequence", dict, ""), "value", str, "sequence."),
        function=_unique(texts("FUNCTION")),
        catalytic_activity=_unique(_member(reaction, "name", str, where) for reaction, where in reactions),
        ec_numbers=_unique(ec_numbers + [_member(reaction, "ecNumber", str, where) for reaction, where in reactions]),
        cofactor=_unique(cofactors),
        pathway=_unique(texts("PATHWAY")),
        subcellular_location=_unique(locations),
        similarity=_unique(texts("SIMILARITY")),
        domains=_unique(features({"Domain"}) + texts("DOMAIN")),
        motifs=_unique(features({"Motif"})),
        ptm=_unique(texts("PTM") + features(_JSON_PTM_FEATURES)),
        tissue_specificity=_unique(texts("TISSUE SPECIFICITY")),
        keywords=_unique(_member(keyword, "name", str, where) for keyword, where in _objects(result, "keywords", "")),
        **{name: _unique(values) for name, values in go.items()},
    )


def _json_entries(document: Any) -> list[Any]:
    """The entries of a UniProt REST document: a search or stream response `{"results": [...]}`, one entry (what
    `/uniprotkb/<accession>.json` returns) or an array of entries; else a ValueError saying what is there."""
    if isinstance(document, dict) and "results" in document:
        if not isinstance(document["results"], list):
            raise ValueError(f"results: expected an array of entries, got {_describe(document['results'])}")
        return document["results"]
    if isinstance(document, dict) and "primaryAccession" in document:
        return [document]
    if isinstance(document, list):
        return document
    raise ValueError(
        f'not UniProt JSON: expected {{"results": [...]}}, an entry or an array of entries, got {_describe(document)}'
    )


def _read_json(path: Path, report: ReadReport) -> Iterator[UniProtEntry]:
    """A REST response is one JSON document, so it is loaded per file; each entry is mapped on its own."""
    try:
        with _open_text(path) as handle:
            results = _json_entries(json.load(handle))
    except (OSError, ValueError, EOFError, zlib.error) as error:  # unreadable, not JSON, or not UniProt's layout
        report.skip(str(path), "whole file", f"{type(error).__name__}: {error}")
        return
    for index, result in enumerate(results):
        try:
            entry = checked_entry(entry_from_json(result))
        except Exception as error:  # noqa: BLE001 - one malformed result skips only itself
            accession = result.get("primaryAccession") if isinstance(result, dict) else None
            where = accession if isinstance(accession, str) and accession else f"entry #{index}"
            report.skip(str(path), where, f"{type(error).__name__}: {error}")
            continue
        report.read[str(path)] += 1
        yield entry


def iter_entries(path: str | Path, report: ReadReport | None = None, workers: int = 1) -> Iterator[UniProtEntry]:
    """Entries of a UniProtKB file (flat/XML/JSON, optionally gzipped) or of every such file in a folder.

    Problems go to `report` (pass one in to see them); a file of unknown format is reported, not guessed at, and so
    is a path that is not a readable file (see `_files`).
    `workers` > 1 parses flat-file records in that many processes (Biopython parsing is CPU-bound); entries and
    report are the same as with one, in the same order. XML and JSON are always read in this process. Workers are
    started with "spawn", so a calling script needs the usual `if __name__ == "__main__":` guard.
    """
    report = report if report is not None else ReadReport()
    if not os.path.lexists(path):
        raise ValueError(f"uniprot: {path} does not exist; give UniProtKB files or folders")
    # spawn, not fork: safe in callers that run threads (progress bars, tokenizers), same on every OS
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        for file in _files(Path(path), report):
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
