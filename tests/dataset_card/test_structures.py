"""Structures indexed by the accessions their files declare, and attached onto full UniProt sequences."""

import pytest

from dataset_card.structures import StructureIndex, file_references
from dataset_card.uniprot_reader import iter_entries
from tests.conftest import FIXTURES, STRUCTURES


@pytest.fixture(scope="module")
def index() -> StructureIndex:
    return StructureIndex.scan(STRUCTURES)


@pytest.fixture(scope="module")
def entries() -> dict:
    return {entry.accession: entry for entry in iter_entries(FIXTURES / "uniprot")}


def test_accessions_come_from_dbref_struct_ref_and_alphafold_names(index) -> None:
    files = {ref.path.name for ref in index.references["P00698"]}
    assert files == {"bio3d__1dpx.pdb", "bio3d__1hel.pdb", "biotite__1aki.cif", "biotite__1aki.pdb"}
    # 4HHB holds two proteins: chains A/C are haemoglobin alpha, B/D beta, in both formats.
    assert {ref.chain for ref in index.references["P69905"]} == {"A", "C"}
    assert {ref.chain for ref in index.references["P68871"]} == {"B", "D"}
    (alphafold,) = index.references["P04629"]
    assert alphafold.predicted and alphafold.path.name == "graphein__AF-P04629-F1__P04629.pdb"
    # Single-chain extracts without DBREF records declare nothing, so they are not guessed at.
    assert all("DeepFRI" not in ref.path.name for refs in index.references.values() for ref in refs)


def test_cif_and_pdb_headers_agree() -> None:
    assert file_references(STRUCTURES / "biotite__1aki.cif") == file_references(STRUCTURES / "biotite__1aki.pdb")
    assert file_references(STRUCTURES / "biotite__1aki.cif") == [("P00698", "A")]


def test_attach_aligns_the_mature_chain_onto_the_full_precursor(index, entries) -> None:
    lysozyme = entries["P00698"]  # 147 residues: an 18-residue signal peptide, then the 129-residue mature chain
    attached = index.attach("P00698", lysozyme.sequence)
    assert attached.coords.shape == (147, 3) and attached.coords.dtype.name == "float32"
    assert attached.coords_mask[18:].all() and not attached.coords_mask[:18].any()
    assert (attached.coords[:18] == 0).all()


def test_attach_picks_the_chain_resolving_most_residues(index, entries) -> None:
    precursor = entries["P05067"]  # 770 residues; 2BEG models residues 17-42 of A-beta in five chains
    attached = index.attach("P05067", precursor.sequence)
    assert attached.coords_mask.sum() == 26
    assert attached.source.startswith("biopython__2BEG")


def test_unknown_accession_and_wrong_folder(index, tmp_path) -> None:
    assert index.attach("Q00000", "MKV") is None
    with pytest.raises(ValueError, match="not a folder"):
        StructureIndex.scan(tmp_path / "missing")


def test_unreadable_header_is_skipped_not_fatal(tmp_path) -> None:
    (tmp_path / "broken.cif.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "AF-P12345-F1-model_v4.pdb").write_text("garbage\n")
    index = StructureIndex.scan(tmp_path)
    assert list(index.references) == ["P12345"]
