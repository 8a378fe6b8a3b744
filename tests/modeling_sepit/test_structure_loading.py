"""load_structure / align_structure_to_sequence on real PDB, mmCIF and AlphaFold DB files, checked against the files'
own ATOM lines and against UniProt entries; bad input of every kind must end in a ValueError that says what is wrong."""

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from Bio import SwissProt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_sepit.structure_loading import (
    VALID_AMINO_ACIDS,
    ProteinStructure,
    align_structure_to_sequence,
    load_structure,
)
from tests.conftest import FIXTURES

STRUCTURES = FIXTURES / "structures"
UNIPROT = FIXTURES / "uniprot"
ALPHAFOLD = STRUCTURES / "graphein__AF-P04629-F1__P04629.pdb"
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
# Protein chains of the files with several (author chain ids); every other file has exactly one.
MULTI_CHAIN = {
    "EMBOSS__2hhb.ent": ["A", "B", "C", "D"],
    "graphein__4hhb.cif": ["A", "B", "C", "D"],
    "graphein__4hhb.pdb": ["A", "B", "C", "D"],
    "biopython__2BEG.cif": ["A", "B", "C", "D", "E"],
    "biopython__2BEG.pdb": ["A", "B", "C", "D", "E"],
}
STRUCTURE_FILES = sorted(path.name for path in STRUCTURES.iterdir() if path.suffix in {".pdb", ".ent", ".cif"})


def uniprot_sequence(accession: str) -> str:
    """The canonical sequence of a UniProt entry kept in tests/fixtures/uniprot (flat file or REST JSON)."""
    flat = UNIPROT / f"{accession}.dat"
    if flat.exists():
        with flat.open() as handle:
            return SwissProt.read(handle).sequence
    with gzip.open(UNIPROT / f"{accession}.json.gz", "rt") as handle:
        (entry,) = json.load(handle)["results"]
    assert entry["primaryAccession"] == accession
    return entry["sequence"]["value"]


def ca_line(path: Path, chain: str, residue: str) -> tuple[np.ndarray, float]:
    """C-alpha x, y, z and B-factor of one residue, read from the PDB columns (x 31-38, y 39-46, z 47-54, B 61-66)."""
    for line in path.read_text().splitlines():
        if line.startswith(("ATOM  ", "HETATM")) and line[12:16] == " CA " and line[21] == chain:
            if line[22:27].strip() == residue:
                return np.array([line[30:38], line[38:46], line[46:54]], dtype=np.float32), float(line[60:66])
    raise AssertionError(f"no CA line for {chain} {residue} in {path.name}")


def resolved(structure: ProteinStructure) -> int:
    return int(np.isfinite(structure.coords).all(-1).sum())


def check_invariants(structure: ProteinStructure) -> None:
    length = len(structure.sequence)
    assert length > 0 and set(structure.sequence) <= VALID_AMINO_ACIDS
    assert structure.coords.shape == (length, 3) and structure.coords.dtype == np.float32
    assert len(structure.residue_ids) == length
    assert structure.plddt is None or (structure.plddt.shape == (length,) and structure.plddt.dtype == np.float32)


# --- every fixture file -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRUCTURE_FILES)
def test_every_fixture_file_loads(name):
    chains = MULTI_CHAIN.get(name, [None])
    if len(chains) > 1:
        with pytest.raises(ValueError, match="several protein chains") as error:
            load_structure(STRUCTURES / name)
        assert all(f"'{chain}'" in str(error.value) for chain in chains) and "chain=" in str(error.value)
    for chain in chains:
        structure = load_structure(STRUCTURES / name, chain=chain)
        check_invariants(structure)
        assert structure.source == str(STRUCTURES / name)
        assert chain is None or structure.chain == chain
        assert resolved(structure) == len(structure.sequence)  # every residue of these files has its CA
        assert "X" not in structure.sequence
        assert (structure.plddt is not None) == (name == ALPHAFOLD.name)


def test_fixture_list_covers_all_formats():
    assert {Path(name).suffix for name in STRUCTURE_FILES} == {".pdb", ".ent", ".cif"}


def distances(coords: np.ndarray) -> np.ndarray:
    return np.linalg.norm(coords[:, None] - coords[None], axis=-1)


# The 4HHB mmCIF is a later revision (4.x, 2023) whose coordinates were moved to another frame than the PDB file's
# (1984 revision): same structure up to a rigid motion, so only its internal distances agree.
CROSS_FORMAT = [
    ("biotite__1aki", None, True),
    ("biopython__1LCD", "A", True),
    ("biopython__2BEG", "C", True),
    ("biopython__1A8O", None, True),
    ("graphein__4hhb", "B", False),
]


@pytest.mark.parametrize(("stem", "chain", "same_frame"), CROSS_FORMAT)
def test_pdb_and_mmcif_of_one_entry_agree(stem, chain, same_frame):
    from_pdb = load_structure(STRUCTURES / f"{stem}.pdb", chain=chain)
    from_cif = load_structure(STRUCTURES / f"{stem}.cif", chain=chain)
    assert from_pdb.sequence == from_cif.sequence
    assert from_pdb.residue_ids == from_cif.residue_ids
    assert from_pdb.chain == from_cif.chain
    np.testing.assert_allclose(distances(from_pdb.coords), distances(from_cif.coords), atol=5e-3)
    if same_frame:
        np.testing.assert_allclose(from_pdb.coords, from_cif.coords, atol=1e-3)


def test_old_style_ent_file_matches_4hhb():
    """2HHB (an .ent file in the pre-remediation format) and 4HHB are the same deoxyhaemoglobin chains."""
    for chain in "ABCD":
        old = load_structure(STRUCTURES / "EMBOSS__2hhb.ent", chain=chain)
        new = load_structure(STRUCTURES / "graphein__4hhb.pdb", chain=chain)
        assert old.sequence == new.sequence and old.residue_ids == new.residue_ids


def test_author_chain_ids_for_mmcif():
    """1LCD's protein is label_asym_id C but author chain A; author chains B and C are the operator DNA."""
    structure = load_structure(STRUCTURES / "biopython__1LCD.cif")
    assert structure.chain == "A" and len(structure.sequence) == 51
    with pytest.raises(ValueError, match=r"no protein chain 'C'.*available: 'A'"):
        load_structure(STRUCTURES / "biopython__1LCD.cif", chain="C")


def test_first_model_only():
    """2BEG.cif has 10 NMR models; the loader must give model 1 (the one in 2BEG.pdb), not a mix or the last."""
    structure = load_structure(STRUCTURES / "biopython__2BEG.cif", chain="E")
    xyz, _ = ca_line(STRUCTURES / "biopython__2BEG.pdb", "E", "20")
    np.testing.assert_allclose(structure.coords[structure.residue_ids.index("20")], xyz, atol=1e-3)


# --- coordinates against the files' own ATOM lines ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "chain", "residue"),
    [
        ("biotite__1aki.pdb", "A", "1"),
        ("biotite__1aki.pdb", "A", "129"),
        ("EMBOSS__2hhb.ent", "B", "10"),
        ("biopython__1A8O.pdb", "A", "151"),  # HETATM MSE: a modified residue kept as M
        ("graphein__AF-P04629-F1__P04629.pdb", "A", "100"),
    ],
)
def test_coordinates_match_ca_lines(name, chain, residue):
    path = STRUCTURES / name
    structure = load_structure(path, chain=chain)
    xyz, _ = ca_line(path, chain, residue)
    np.testing.assert_allclose(structure.coords[structure.residue_ids.index(residue)], xyz, atol=1e-3)


def test_modified_residue_kept_with_parent_letter():
    structure = load_structure(STRUCTURES / "biopython__1A8O.pdb")
    assert structure.residue_ids[0] == "151" and structure.sequence[0] == "M"  # MSE 151 is a HETATM record
    assert structure.sequence == load_structure(STRUCTURES / "biopython__1A8O.cif").sequence


def test_first_altloc_is_kept():
    """3O5R GLU 20 has its CA in two conformations, A (46.352, -3.160, 2.845) and B; the first one is kept."""
    structure = load_structure(STRUCTURES / "biotite__3o5r.cif")
    lines = [line.split() for line in (STRUCTURES / "biotite__3o5r.cif").read_text().splitlines()]
    altloc_a = next(f for f in lines if f[:1] == ["ATOM"] and f[3:5] == ["CA", "A"] and f[16] == "20" and f[18] == "A")
    np.testing.assert_allclose(structure.coords[structure.residue_ids.index("20")], np.float32(altloc_a[10:13]))
    assert len(structure.residue_ids) == len(set(structure.residue_ids))


def test_insertion_codes_missing_ca_unknown_residue_and_hetero_groups(tmp_path):
    """A PDB built from 1AKI's first four residues: residue 2 renumbered 1A, no CA for residue 3, residue 4 renamed
    UNK, and a sulfate and two waters added; one entry per residue, in file order."""
    lines = [line for line in (STRUCTURES / "biotite__1aki.pdb").read_text().splitlines() if line.startswith("ATOM")]
    edited = []
    for line in lines:
        residue = int(line[22:26])
        if residue > 4 or (residue == 3 and line[12:16] == " CA "):
            continue
        if residue == 2:
            line = line[:22] + "   1A" + line[27:]
        if residue == 4:
            line = line[:17] + "UNK" + line[20:]
        edited.append(line)
    edited += [
        "HETATM  999  S   SO4 A 201      10.000  10.000  10.000  1.00 20.00           S",
        "HETATM 1000  O   HOH A 301      11.000  11.000  11.000  1.00 20.00           O",
        "HETATM 1001  O   HOH A 302      12.000  12.000  12.000  1.00 20.00           O",
    ]
    path = tmp_path / "edited.pdb"
    path.write_text("\n".join(edited) + "\nEND\n")
    structure = load_structure(path)
    assert structure.sequence == "KVFX"
    assert structure.residue_ids == ["1", "1A", "3", "4"]
    assert np.isnan(structure.coords[2]).all() and np.isfinite(structure.coords[[0, 1, 3]]).all()
    np.testing.assert_allclose(structure.coords[0], ca_line(STRUCTURES / "biotite__1aki.pdb", "A", "1")[0])

    coords, mask = align_structure_to_sequence(structure, "KVFX")
    assert mask.tolist() == [True, True, False, True] and np.isnan(coords[2]).all()


# --- gzip and AlphaFold -------------------------------------------------------------------------------------------


GZIPPED = [
    ("biotite__1aki.pdb", None),
    ("biopython__1A8O.cif", None),
    ("EMBOSS__2hhb.ent", "D"),
    (ALPHAFOLD.name, None),
]


@pytest.mark.parametrize(("name", "chain"), GZIPPED)
def test_gzipped_file_gives_the_same_structure(tmp_path, name, chain):
    gzipped = tmp_path / f"{name}.gz"
    gzipped.write_bytes(gzip.compress((STRUCTURES / name).read_bytes()))
    plain, packed = load_structure(STRUCTURES / name, chain=chain), load_structure(gzipped, chain=chain)
    assert (plain.sequence, plain.residue_ids, plain.chain) == (packed.sequence, packed.residue_ids, packed.chain)
    np.testing.assert_array_equal(plain.coords, packed.coords)
    assert (plain.plddt is None) == (packed.plddt is None)
    if plain.plddt is not None:
        np.testing.assert_array_equal(plain.plddt, packed.plddt)
    assert packed.source == str(gzipped)


def test_alphafold_plddt():
    structure = load_structure(ALPHAFOLD)
    assert len(structure.sequence) == 796 and structure.plddt is not None
    assert structure.plddt.shape == (796,) and np.isfinite(structure.plddt).all()
    assert (structure.plddt >= 0).all() and (structure.plddt <= 100).all()
    assert structure.plddt[structure.residue_ids.index("100")] == pytest.approx(ca_line(ALPHAFOLD, "A", "100")[1])


def test_alphafold_detected_by_file_name_and_by_mmcif_qa_metric(tmp_path):
    named = tmp_path / "AF-P00698-F1-model_v4.pdb"
    shutil.copy(STRUCTURES / "biotite__1aki.pdb", named)
    structure = load_structure(named)
    assert structure.plddt is not None and structure.plddt[0] == ca_line(named, "A", "1")[1]

    with_metric = tmp_path / "model.cif"
    text = (STRUCTURES / "biotite__1aki.cif").read_text()
    with_metric.write_text(
        text + "#\nloop_\n_ma_qa_metric.id\n_ma_qa_metric.name\n_ma_qa_metric.type\n1 pLDDT pLDDT\n#\n"
    )
    assert load_structure(with_metric).plddt is not None
    assert load_structure(STRUCTURES / "biotite__1aki.cif").plddt is None


# --- sequences against UniProt ------------------------------------------------------------------------------------

# (file, chain, UniProt accession, offset: UniProt position = author residue number + offset, from the DBREF records)
MATCHED = [
    ("biotite__1aki.pdb", None, "P00698", 18),
    ("biotite__1aki.cif", None, "P00698", 18),
    ("bio3d__1hel.pdb", None, "P00698", 18),
    ("bio3d__1dpx.pdb", None, "P00698", 18),
    *[("biopython__2BEG.pdb", chain, "P05067", 671) for chain in "ABCDE"],
    ("biopython__2BEG.cif", "A", "P05067", 671),
]
# Not in the UniProt corpus the fixtures come from: P69905 / P68871 (4HHB, 2HHB), P03023 (1LCD, 2PE5 chain B),
# P62330 (2W83 chain E). They are cross-checked between structures instead (see the 2HHB and lac repressor tests).


@pytest.mark.parametrize(("name", "chain", "accession", "offset"), MATCHED)
def test_structure_matches_its_uniprot_entry(name, chain, accession, offset):
    structure = load_structure(STRUCTURES / name, chain=chain)
    sequence = uniprot_sequence(accession)
    coords, mask = align_structure_to_sequence(structure, sequence)
    assert coords.shape == (len(sequence), 3) and coords.dtype == np.float32 and mask.dtype == bool
    assert mask.sum() >= 0.98 * resolved(structure)
    # Each residue lands where the entry's DBREF record says (UniProt position = author number + offset), and the
    # letters there agree.
    positions = [int(residue) + offset - 1 for residue in structure.residue_ids]
    np.testing.assert_array_equal(coords[positions], structure.coords)
    same = [structure.sequence[i] == sequence[j] for i, j in enumerate(positions) if mask[j]]
    assert np.mean(same) >= 0.98


def test_fragment_of_a_long_uniprot_sequence():
    """2BEG is amyloid-beta 17-42, 26 residues of the 770-residue APP (P05067 688-713): all 26 are placed, and every
    other position of the full sequence is NaN / False."""
    structure = load_structure(STRUCTURES / "biopython__2BEG.pdb", chain="A")
    sequence = uniprot_sequence("P05067")
    coords, mask = align_structure_to_sequence(structure, sequence)
    assert len(sequence) == 770 and len(structure.sequence) == 26
    assert mask.sum() == resolved(structure) == 26
    assert np.flatnonzero(mask).tolist() == list(range(687, 713))
    assert np.isnan(coords[~mask]).all() and np.isfinite(coords[mask]).all()


def test_lysozyme_placed_after_its_signal_peptide():
    structure = load_structure(STRUCTURES / "biotite__1aki.pdb")
    coords, mask = align_structure_to_sequence(structure, uniprot_sequence("P00698"))
    assert np.flatnonzero(mask).tolist() == list(range(18, 147))
    np.testing.assert_array_equal(coords[mask], structure.coords)


def test_lac_repressor_headpiece_placed_in_the_longer_chain():
    """P03023 is not in the corpus; 2PE5 chain B (lac repressor 2-331) stands in as the longer sequence: 1LCD
    (headpiece 1-51) lands on residues 2-51 by author numbering, its Met1 has no partner, everything else is NaN."""
    headpiece = load_structure(STRUCTURES / "biopython__1LCD.pdb", chain="A")
    repressor = load_structure(STRUCTURES / "DeepFRI__2PE5-B.pdb")
    coords, mask = align_structure_to_sequence(headpiece, repressor.sequence)
    assert mask.sum() == resolved(headpiece) - 1 == 50
    assert [repressor.residue_ids[j] for j in np.flatnonzero(mask)] == headpiece.residue_ids[1:]
    np.testing.assert_array_equal(coords[mask], headpiece.coords[1:])
    assert np.isnan(coords[~mask]).all()


def test_selenocysteine_and_pyrrolysine_letters_align():
    structure = load_structure(STRUCTURES / "biotite__1aki.pdb")
    sequence = structure.sequence.replace("C", "U", 1).replace("K", "O", 1)
    _, mask = align_structure_to_sequence(structure, sequence)
    assert mask.all()


# --- bad input ----------------------------------------------------------------------------------------------------


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.pdb: no such structure file"):
        load_structure(tmp_path / "missing.pdb")


def test_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_structure(tmp_path)


@pytest.mark.parametrize("name", ["empty.pdb", "empty.cif", "blank.pdb"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path / name, b"\n  \n" if name.startswith("blank") else b"")
    with pytest.raises(ValueError, match=rf"{name}: the structure file is empty"):
        load_structure(path)


@pytest.mark.parametrize("name", ["garbage.pdb", "garbage.cif"])
def test_binary_garbage(tmp_path, name):
    path = write(tmp_path / name, random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=rf"{name}: binary content"):
        load_structure(path)


def test_non_utf8_text(tmp_path):
    path = write(tmp_path / "latin.pdb", b"HEADER    caf\xe9\n")
    with pytest.raises(ValueError, match="binary content .not UTF-8 at byte 13"):
        load_structure(path)


def test_truncated_pdb(tmp_path):
    path = write(tmp_path / "truncated.pdb", (STRUCTURES / "biotite__1aki.pdb").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"truncated\.pdb: no ATOM/HETATM records"):
        load_structure(path)


@pytest.mark.parametrize(("name", "size"), [("biotite__1aki.pdb", 50_000), ("biotite__1aki.cif", 80_000)])
def test_file_cut_inside_the_atom_records(tmp_path, name, size):
    path = write(tmp_path / name, (STRUCTURES / name).read_bytes()[:size])
    with pytest.raises(ValueError, match=rf"{name}: cannot read the atoms as (PDB|mmCIF)"):
        load_structure(path)


def test_truncated_mmcif_without_atoms(tmp_path):
    path = write(tmp_path / "truncated.cif", (STRUCTURES / "biotite__1aki.cif").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"truncated\.cif: no atom_site category"):
        load_structure(path)


def test_corrupt_gzip(tmp_path):
    packed = gzip.compress((STRUCTURES / "biotite__1aki.pdb").read_bytes())
    path = write(tmp_path / "half.pdb.gz", packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"half\.pdb\.gz: corrupt or truncated gzip"):
        load_structure(path)
    not_gzip = write(tmp_path / "plain.pdb.gz", (STRUCTURES / "biotite__1aki.pdb").read_bytes())
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        load_structure(not_gzip)


@pytest.mark.parametrize("name", ["protein.txt", "protein.gz", "protein.pdbqt", "protein"])
def test_unknown_suffix(tmp_path, name):
    path = write(tmp_path / name, (STRUCTURES / "biotite__1aki.pdb").read_bytes())
    with pytest.raises(ValueError, match=rf"{name}: unknown structure file suffix; accepted: .pdb, .ent, .cif, .mmcif"):
        load_structure(path)


def test_accepted_suffixes_in_any_case(tmp_path):
    for name in ["x.ENT", "x.mmcif", "x.PDB.GZ"]:
        source = STRUCTURES / ("biotite__1aki.cif" if "cif" in name else "biotite__1aki.pdb")
        data = source.read_bytes()
        path = write(tmp_path / name, gzip.compress(data) if name.endswith("GZ") else data)
        assert len(load_structure(path).sequence) == 129


def test_unknown_chain():
    with pytest.raises(ValueError, match=r"no protein chain 'Z'.*available: 'A', 'B', 'C', 'D'"):
        load_structure(STRUCTURES / "graphein__4hhb.pdb", chain="Z")


def test_several_chains_without_chain():
    with pytest.raises(ValueError, match=r"several protein chains \('A', 'B', 'C', 'D', 'E'\); pass chain="):
        load_structure(STRUCTURES / "biopython__2BEG.pdb")


def test_only_waters_and_ligands(tmp_path):
    path = write(
        tmp_path / "waters.pdb",
        b"HETATM    1  O   HOH A   1      11.000  11.000  11.000  1.00 20.00           O\n"
        b"HETATM    2  O   HOH A   2      12.000  12.000  12.000  1.00 20.00           O\n"
        b"HETATM    3 ZN    ZN A   3      13.000  13.000  13.000  1.00 20.00          ZN\n"
        b"HETATM    4  S   SO4 A   4      10.000  10.000  10.000  1.00 20.00           S\n"
        b"END\n",
    )
    with pytest.raises(ValueError, match=r"waters\.pdb: no protein chain"):
        load_structure(path)


def test_nucleic_acid_only(tmp_path):
    lines = (STRUCTURES / "biopython__1LCD.pdb").read_text().splitlines()
    dna = [line for line in lines if line.startswith("ATOM") and line[21] in "BC"]
    path = write(tmp_path / "dna.pdb", ("\n".join(dna) + "\nEND\n").encode())
    with pytest.raises(ValueError, match="no protein chain"):
        load_structure(path)


def test_no_atoms(tmp_path):
    header_only = write(
        tmp_path / "header.pdb", b"HEADER    HYDROLASE                               19-MAY-97   1AKI\nEND\n"
    )
    with pytest.raises(ValueError, match="no ATOM/HETATM records"):
        load_structure(header_only)
    entry_only = write(tmp_path / "entry.cif", b"data_1AKI\n_entry.id 1AKI\n")
    with pytest.raises(ValueError, match="no atom_site category"):
        load_structure(entry_only)
    not_cif = write(tmp_path / "text.cif", b"this is not a CIF file\n")
    with pytest.raises(ValueError, match=r"text\.cif: cannot parse as mmCIF"):
        load_structure(not_cif)


@pytest.fixture(scope="module")
def lysozyme() -> ProteinStructure:
    return load_structure(STRUCTURES / "biotite__1aki.pdb")


INVALID_SEQUENCES = [
    (
        "kvfgrcelaa",
        r"sequence: invalid amino-acid letters \('k' at 0, 'v' at 1, 'f' at 2, 'g' at 3, 'r' at 4 and 5",
    ),
    ("KVFG1RC2", r"'1' at 4, '2' at 7\); use uppercase one-letter codes"),
    ("KVF GRC", r"' ' at 3"),
    ("KVF-GRC*", r"'-' at 3, '\*' at 7"),
]


@pytest.mark.parametrize(("sequence", "message"), INVALID_SEQUENCES)
def test_invalid_sequence_letters(lysozyme, sequence, message):
    with pytest.raises(ValueError, match=message):
        align_structure_to_sequence(lysozyme, sequence)


def test_empty_sequence(lysozyme):
    with pytest.raises(ValueError, match="empty"):
        align_structure_to_sequence(lysozyme, "")


def test_mismatched_sequence(lysozyme):
    with pytest.raises(ValueError, match=r"does not match the sequence \(identity \d+\.\d% over \d+ aligned residues"):
        align_structure_to_sequence(lysozyme, uniprot_sequence("P05067"))
    glycines = ProteinStructure("GGGG", np.zeros((4, 3), np.float32), ["1", "2", "3", "4"], None, "A", "made-up")
    with pytest.raises(ValueError, match="identity 0.0% over 0 aligned residues"):
        align_structure_to_sequence(glycines, "W")  # BLOSUM62 W/G < 0: W goes to a free end gap


def test_structure_without_residues():
    empty = ProteinStructure("", np.zeros((0, 3), np.float32), [], None, "A", "made-up")
    with pytest.raises(ValueError, match="made-up: the structure has no residues"):
        align_structure_to_sequence(empty, "ACD")


# --- property tests -----------------------------------------------------------------------------------------------

CORRUPTIBLE = [("biotite__1aki.pdb", None), ("biopython__1A8O.cif", None), ("biopython__1LCD.pdb", "A")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from(CORRUPTIBLE),
    packed=st.booleans(),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "delete", "insert"]),
            st.floats(0, 1, exclude_max=True),
            st.binary(min_size=1, max_size=1),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_corrupted_files_only_raise_value_error(tmp_path_factory, source, packed, edits):
    name, chain = source
    data = bytearray((STRUCTURES / name).read_bytes())
    if packed:
        data = bytearray(gzip.compress(bytes(data), mtime=0))
    for kind, where, byte in edits:
        at = int(where * len(data))
        if kind == "flip":
            data[at] ^= byte[0] or 0xFF
        elif kind == "delete":
            del data[at]
        else:
            data[at:at] = byte
    path = tmp_path_factory.mktemp("corrupt") / (name + (".gz" if packed else ""))
    path.write_bytes(bytes(data))
    try:
        structure = load_structure(path, chain=chain)
    except ValueError as error:
        assert str(path) in str(error)
    else:
        check_invariants(structure)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    random_sequence=st.text(alphabet=STANDARD, min_size=1, max_size=300),
    from_structure=st.booleans(),
)
def test_aligning_any_valid_sequence_only_raises_value_error(lysozyme, data, random_sequence, from_structure):
    sequence = random_sequence
    if from_structure:  # a piece of the real sequence with a few substitutions: mostly accepted, sometimes not
        start = data.draw(st.integers(0, len(lysozyme.sequence) - 1))
        stop = data.draw(st.integers(start + 1, len(lysozyme.sequence)))
        letters = list(lysozyme.sequence[start:stop])
        for position in data.draw(st.lists(st.integers(0, len(letters) - 1), max_size=5)):
            letters[position] = data.draw(st.sampled_from(STANDARD))
        sequence = data.draw(st.text(alphabet=STANDARD, max_size=20)) + "".join(letters) + random_sequence[:20]
    try:
        coords, mask = align_structure_to_sequence(lysozyme, sequence)
    except ValueError as error:
        assert "does not match the sequence" in str(error)
    else:
        assert coords.shape == (len(sequence), 3) and mask.shape == (len(sequence),)
        assert mask.sum() <= resolved(lysozyme)
        assert np.isnan(coords[~mask]).all()
