"""The UniProtKB readers on the real demo corpus shipped in dataset_card/data/uniprot (see its SOURCES.md files)."""

import gzip
import re
import shutil
from pathlib import Path

import pytest

from dataset_card.uniprot_reader import ReadReport, UniProtEntry, clean_text, iter_entries

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
