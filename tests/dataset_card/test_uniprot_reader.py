"""The UniProtKB readers on the real demo corpus shipped in dataset_card/data/uniprot (see its SOURCES.md files) and on
real entries from 1986-2010 releases (tests/fixtures/uniprot_old, flat files and XML)."""

import gzip
import io
import re
import shutil
from pathlib import Path

import pytest
from Bio import SwissProt

from dataset_card import uniprot_reader
from dataset_card.uniprot_reader import (
    ReadReport,
    UniProtEntry,
    clean_text,
    detect_format,
    drop_unread_lines,
    entry_from_swissprot,
    iter_entries,
    split_flat_records,
)

DATA = Path(__file__).resolve().parents[2] / "dataset_card" / "data" / "uniprot"
P05067 = DATA / "uniprot_flat_core" / "ff-parser__src__test__resources__entryIT__P05067.dat"
BROKEN = (
    "ff-parser__src__test__resources__entryIT__entryReader2.dat",
    "ff-parser__src__test__resources__entryIT__entryReader2 2.dat",
)

# (entries read, entries with at least one FUNCTION comment, records reported unreadable), obtained once by inspection:
# flat files: per file `grep -c '^ID   '` summed, and
#   awk '/^ID   /{h=0} /^CC   -!- FUNCTION:/{h=1} /^\/\//{if(h)n++; h=0} END{print n+0}' per file, summed;
#   core = 82 flat entries (62 with FUNCTION) + 2 XML entries (1 with <comment type="function">);
#   core's two entryReader2*.dat files hold 4 records each ("testN" + "//") with no ID line: 8 unreadable records.
# JSON: len(results) and results having a commentType == "FUNCTION", over the three files (44 + 52 + 8 = 104).
EXPECTED = {
    "uniprot_flat_core": (84, 63, 8),
    "uniprot_flat_store": (45, 16, 0),
    "uniprot_json": (104, 77, 0),
}


@pytest.fixture(scope="module")
def corpus() -> dict[str, tuple[list[UniProtEntry], ReadReport]]:
    result = {}
    for folder in EXPECTED:
        report = ReadReport()
        result[folder] = (list(iter_entries(DATA / folder, report)), report)
    return result


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_entry_and_function_counts(corpus, folder: str) -> None:
    entries, report = corpus[folder]
    n_entries, n_function, n_skipped = EXPECTED[folder]
    assert len(entries) == report.total_read == n_entries
    assert sum(1 for e in entries if e.function) == n_function
    assert report.total_skipped == len(report.problems) == n_skipped


def test_broken_records_are_reported_not_dropped(corpus) -> None:
    _, report = corpus["uniprot_flat_core"]
    assert {Path(p.file).name for p in report.problems} == set(BROKEN)
    assert all("ID" in p.reason for p in report.problems)
    assert sorted(p.entry for p in report.problems) == sorted([f"entry #{i}" for i in range(4)] * 2)
    for name in BROKEN:
        assert report.skipped[str(DATA / "uniprot_flat_core" / name)] == 4


def test_good_records_after_a_broken_one_are_still_read(tmp_path: Path) -> None:
    text = P05067.read_text()
    (tmp_path / "mixed.dat").write_text(
        "ID   garbage\nXX   not an entry\n//\n" + text + "ID   TRUNC_HUMAN\nAC   P99999;\n"
    )
    report = ReadReport()
    entries = list(iter_entries(tmp_path / "mixed.dat", report))
    assert [e.accession for e in entries] == ["P05067"]
    assert [p.entry for p in report.problems] == ["entry #0", "P99999"]
    assert "terminator" in report.problems[1].reason


def test_gzip_flat_and_json(tmp_path: Path) -> None:
    with P05067.open("rb") as source, gzip.open(tmp_path / "P05067.dat.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    assert list(iter_entries(tmp_path / "P05067.dat.gz")) == list(iter_entries(P05067))
    gz_json = list(iter_entries(DATA / "uniprot_json" / "test_json__small.json.gz"))
    assert len(gz_json) == 44 and all(e.sequence for e in gz_json)


def test_format_is_sniffed_without_a_known_suffix(tmp_path: Path) -> None:
    shutil.copy(P05067, tmp_path / "entry.unknown")
    shutil.copy(DATA / "uniprot_json" / "uniprot_results.json", tmp_path / "results.unknown2")
    assert len(list(iter_entries(tmp_path))) == 1 + 8


def test_flat_entry_fields() -> None:
    (entry,) = iter_entries(P05067)
    assert (entry.accession, entry.name, entry.protein_name) == ("P05067", "A4_HUMAN", "Amyloid-beta precursor protein")
    assert entry.organism == "Homo sapiens (Human)"
    assert entry.sequence.startswith("MLPGLALLLLAAWTARA")
    assert entry.similarity == ["Belongs to the APP family"]
    assert {"E1", "BPTI/Kunitz inhibitor", "E2"} <= set(entry.domains)
    assert "OX-2" in entry.motifs and "Cell membrane" in entry.subcellular_location
    assert "amyloid-beta complex" in entry.go_cellular_component and "Alzheimer disease" in entry.keywords
    assert entry.go_molecular_function and entry.go_biological_process


def test_json_entry_fields(corpus) -> None:
    entries, _ = corpus["uniprot_json"]
    enzymes = [e for e in entries if e.ec_numbers]
    assert enzymes and all(re.fullmatch(r"[\d.n-]+", ec) for e in enzymes for ec in e.ec_numbers)
    assert any(e.catalytic_activity for e in enzymes)  # some have an EC on the name only, no reaction comment
    assert any(e.go_cellular_component for e in entries) and any(e.cofactor for e in entries)


def test_no_accession_in_both_json_and_flat(corpus) -> None:
    # The brief asks JSON and flat readers to agree on a shared accession "if any": these corpora share none, so
    # agreement is checked on what both formats hold for every entry (accession, name and a protein sequence).
    flat = {e.accession for f in ("uniprot_flat_core", "uniprot_flat_store") for e in corpus[f][0]}
    json_entries = corpus["uniprot_json"][0]
    assert not flat & {e.accession for e in json_entries}
    assert all(e.accession and e.name and re.fullmatch(r"[A-Z]+", e.sequence) for e in json_entries)


def test_evidence_tags_are_stripped(corpus) -> None:
    assert clean_text("Binds zinc (PubMed:123, Ref.4). {ECO:0000269|PubMed:1,  ECO:0000255}.") == "Binds zinc"
    for entries, _ in corpus.values():
        for entry in entries:
            for name, value in vars(entry).items():
                texts = value if isinstance(value, list) else [value]
                assert not any("{ECO:" in t or "(PubMed:" in t or "  " in t for t in texts), (entry.accession, name)


def _parsed(text: str) -> UniProtEntry | str:
    """What Biopython + `entry_from_swissprot` make of a record: the entry, or the error it raised."""
    try:
        return entry_from_swissprot(SwissProt.read(io.StringIO(text)))
    except Exception as error:  # noqa: BLE001 - the error itself is compared
        return f"{type(error).__name__}: {error}"


FLAT_FILES = sorted(p for p in DATA.rglob("*") if p.is_file() and detect_format(p) == "flat")


def test_every_demo_flat_file_is_compared() -> None:
    assert len(FLAT_FILES) == 79 + 41  # all but the two XML files of core, every file of store


@pytest.mark.parametrize("path", FLAT_FILES, ids=lambda p: p.name)
def test_dropping_unread_lines_keeps_every_entry(path: Path) -> None:
    # The full record parsed by Biopython is the reference; the reader must give the same entries and problems.
    records = list(split_flat_records([path.read_text(encoding="utf-8")]))
    assert all(done for _, done in records)
    expected = [_parsed(text) for text, _ in records]
    assert [_parsed(drop_unread_lines(text)) for text, _ in records] == expected
    report = ReadReport()
    assert list(iter_entries(path, report)) == [e for e in expected if isinstance(e, UniProtEntry)]
    reasons = [e for e in expected if isinstance(e, str)]  # the reader adds the line Biopython failed on
    assert len(report.problems) == len(reasons)
    assert all(p.reason.endswith(reason) for p, reason in zip(report.problems, reasons, strict=True))


def test_dropped_feature_keeps_its_continuation_lines_past_other_lines() -> None:
    # Biopython adds an FT (CC) continuation line to the last feature (comment) started, even after other lines.
    text = P05067.read_text()
    head, features = text.split("\nFT   ", 1)
    record = (
        head + "\nCC   -!- INTERACTION:\nDR   PDB; 1AAA; X-ray; -.\nCC       P1; P2: NbExp=3;\n"
        "CC   -!- CAUTION\nCC       : kept, its topic is only known once joined.\n"
        'FT   CHAIN           1..10\nKW   Signal.\nFT                   /note="Not a domain"\n'
        'FT   DOMAIN          2..9\nOS   Homo sapiens.\nFT                   /note="Kept domain"\nFT   ' + features
    )
    entry = _parsed(record)
    assert isinstance(entry, UniProtEntry) and "Kept domain" in entry.domains and "Not a domain" not in entry.domains
    assert _parsed(drop_unread_lines(record)) == entry
    kept = drop_unread_lines(record)
    assert "INTERACTION" not in kept and "NbExp" not in kept and "Not a domain" not in kept and "CAUTION" in kept
    assert not re.search(r"^(?:R[NPCXGATL]|\*\*)|^DR   (?!GO)", kept, re.MULTILINE)


def test_orphan_continuation_lines_are_rejected_as_before() -> None:
    text = P05067.read_text()
    record = text.replace("\nFT   ", '\nFT                   /note="no feature yet"\nFT   ', 1)
    assert _parsed(record) == _parsed(drop_unread_lines(record)) == "IndexError: list index out of range"


def test_split_flat_records_gives_the_same_records_for_any_chunking() -> None:
    text = "\n \t\nID   A\nXX   a\n\n// trailing words\n//\n  \nID   B\nXX   b\n//\nID   C\nXX   c"
    expected = [
        ("ID   A\nXX   a\n\n//\n", True),  # blank lines inside a record stay (Biopython rejects them)
        ("//\n", True),
        ("ID   B\nXX   b\n//\n", True),
        ("ID   C\nXX   c\n", False),
    ]
    for size in (1, 2, 3, 5, 1 << 20):
        assert list(split_flat_records(text[i : i + size] for i in range(0, len(text), size))) == expected
    assert list(split_flat_records(io.StringIO(text))) == expected  # lines are chunks too
    assert list(split_flat_records(["ID   D\n//"])) == [("ID   D\n//\n", True)]  # last line without newline


@pytest.mark.parametrize("text", ["Binds\xa0zinc\x1c (Probable).", " a\t\nb  {ECO:1} (PubMed:2) . ", "(x) {y}", ""])
def test_clean_text_matches_the_plain_regex_chain(text: str) -> None:
    text_without_evidence = re.sub(r"\s*\{ECO:[^}]*\}", "", text)
    reference = re.sub(r"\s*\((?:PubMed|Ref\.|By similarity|Probable|Potential)[^()]*\)", "", text_without_evidence)
    assert clean_text(text) == re.sub(r"\s+", " ", reference).strip().rstrip(". ")


def test_workers_give_the_same_entries_and_report(corpus, monkeypatch) -> None:
    monkeypatch.setattr(uniprot_reader, "_BATCH_CHARS", 50_000)  # many small batches: ordering and bounding at work
    for folder in EXPECTED:
        report = ReadReport()
        entries, expected_report = corpus[folder]
        assert list(iter_entries(DATA / folder, report, workers=2)) == entries
        assert (report.read, report.skipped, report.problems) == (
            expected_report.read,
            expected_report.skipped,
            expected_report.problems,
        )


def test_workers_stop_when_the_reader_is_closed_early() -> None:
    entries = iter_entries(DATA / "uniprot_flat_store", workers=2)
    assert isinstance(next(entries), UniProtEntry)
    entries.close()


# --- entries from the 1990s to today --------------------------------------------------------------------------------

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "uniprot_old"
OLD_FILES = sorted(path for path in OLD.iterdir() if path.name != "SOURCES.md")
_DECLARED = re.compile(r"^AC   (\w+)|<entry[^>]*>\s*<accession>(\w+)<", re.MULTILINE)


def declared_accessions(path: Path) -> list[str]:
    """The first accession of each entry, as the file itself states it (first AC line or first <accession>)."""
    text, found = path.read_text(), []
    for record in re.split(r"^//$", text, flags=re.MULTILINE) if path.suffix != ".xml" else [text]:
        found += [flat or xml for flat, xml in _DECLARED.findall(record)][: 1 if path.suffix != ".xml" else None]
    return found


def test_every_old_file_is_read() -> None:
    assert len(OLD_FILES) == 25
    assert sum(len(declared_accessions(path)) for path in OLD_FILES) == 24 + 7  # flat entries, XML entries


@pytest.mark.parametrize("path", OLD_FILES, ids=lambda p: p.name)
def test_old_entries_are_read_plain_and_gzipped(path: Path, tmp_path: Path) -> None:
    report = ReadReport()
    entries = list(iter_entries(path, report))
    assert not report.problems and [e.accession for e in entries] == declared_accessions(path)
    assert all(e.protein_name or e.accession == "IPI00383150" for e in entries)  # the IPI record has no DE line
    packed = tmp_path / f"{path.name}.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    if detect_format(path) is not None:  # suffix-less files are recognised by content, gzipped ones by suffix
        assert list(iter_entries(packed)) == entries


@pytest.mark.parametrize("name", ["F2CXE6", "H2CNN8", "Q13639", "swiss4"])
def test_xml_entries_get_the_go_terms_of_their_flat_file(name: str) -> None:
    xml = {e.accession: e for e in iter_entries(OLD / f"biopython__{name}.xml")}
    flat = {e.accession: e for e in iter_entries(OLD / f"biopython__{name}.txt")}
    shared = xml.keys() & flat.keys()
    kinds = ("go_molecular_function", "go_biological_process", "go_cellular_component")
    assert shared and any(getattr(xml[a], kind) for a in shared for kind in kinds)
    for accession in shared:
        for kind in kinds:
            assert sorted(getattr(xml[accession], kind)) == sorted(getattr(flat[accession], kind)), (accession, kind)


def test_pre_2003_lines_are_read() -> None:
    (entry,) = iter_entries(OLD / "biopython__sp005")  # GN   MTND3 OR ND3 OR NADH3.
    assert (entry.accession, entry.protein_name) == ("P24973", "NADH-UBIQUINONE OXIDOREDUCTASE CHAIN 3")
    assert entry.ec_numbers == ["1.6.5.3"]  # from the old DE form '(EC 1.6.5.3)'
    (entry,) = iter_entries(OLD / "biopython__sp008")  # two AC lines, DT of release 1 (1986)
    assert entry.accession == "P01892" and entry.function


def test_a_failing_line_is_named() -> None:
    text = (OLD / "biopython__sp016").read_text().replace("\nKW   ", "\nZZ   odd line\nKW   ", 1)
    assert uniprot_reader._parse_flat_record(text, True).startswith("ZZ line 'ZZ   odd line': SwissProtParserError")
