"""Reads one protein chain (sequence and C-alpha coordinates) from PDB/mmCIF files, and places it on a full sequence.

Experimental structures miss residues (disordered loops, termini, expression tags cut off), so the coordinates of a
structure are aligned to the sequence the model is given instead of being assumed to cover it.
"""

import errno
import gzip
import io
import os
import re
import stat
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import biotite.structure as struc
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import numpy as np
from Bio.Align import PairwiseAligner, substitution_matrices
from biotite.structure.info import one_letter_code

# The 20 standard amino acids, X (unknown), B/Z (ambiguous Asx/Glx), U (selenocysteine) and O (pyrrolysine).
VALID_AMINO_ACIDS: frozenset[str] = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")
_PDB_SUFFIXES = (".pdb", ".ent")
_CIF_SUFFIXES = (".cif", ".mmcif")
_ACCEPTED = ", ".join(_PDB_SUFFIXES + _CIF_SUFFIXES) + " (optionally gzipped, with .gz appended)"
_ALPHAFOLD_TITLE = re.compile(r"^(?:HEADER|TITLE).*ALPHAFOLD", re.MULTILINE | re.IGNORECASE)
_MIN_IDENTITY = 0.9
# Largest structure text read (after decompression): 128 MiB, about a million atoms of mmCIF. A chain for a 1022-residue
# encoder needs far less; a file (or a gzip bomb) that expands past it would fill memory before parsing could fail.
MAX_STRUCTURE_BYTES = 1 << 27
_FILE_KINDS = {
    stat.S_IFIFO: "named pipe",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}
_BLOSUM_STAND_INS = str.maketrans("UO", "CK")


@dataclass(frozen=True, eq=False)
class ProteinStructure:
    """One chain of a structure file, one entry per residue in file order (`eq=False`: numpy fields have no `==`)."""

    sequence: str
    coords: np.ndarray
    residue_ids: list[str]
    plddt: np.ndarray | None
    chain: str
    source: str


def load_structure(path: str | os.PathLike, chain: str | None = None) -> ProteinStructure:
    """The protein chain `chain` (author chain id; may be omitted when the file has one protein chain) of the first
    model of a PDB or mmCIF file, gzipped or not. Raises ValueError naming the file for anything it cannot read."""
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"structure: expected a PDB/mmCIF file path, got {type(path).__name__}; accepted: {_ACCEPTED}")
    path = Path(path)
    kind = file_kind(path, "structure file")
    if kind == "folder":
        raise ValueError(f"{path}: is a directory, not a structure file")
    if kind != "file":
        raise ValueError(f"{path}: {kind}")
    is_cif = _is_cif(path)
    text = read_structure_text(path)
    atoms, is_alphafold = _parse_cif(text, path) if is_cif else _parse_pdb(text, path)
    atoms = _select_chain(atoms[struc.filter_amino_acids(atoms)], chain, path)

    starts = struc.get_residue_starts(atoms)
    ca = np.flatnonzero(atoms.atom_name == "CA")
    residue_of_ca, first = np.unique(np.searchsorted(starts, ca, side="right") - 1, return_index=True)
    ca = ca[first]  # the first CA of each residue, should a residue list several
    coords = np.full((len(starts), 3), np.nan, dtype=np.float32)
    coords[residue_of_ca] = atoms.coord[ca]
    plddt = None
    if is_alphafold:
        plddt = np.full(len(starts), np.nan, dtype=np.float32)
        plddt[residue_of_ca] = atoms.b_factor[ca]
    return ProteinStructure(
        sequence="".join(_one_letter(name) for name in atoms.res_name[starts]),
        coords=coords,
        residue_ids=[
            f"{number}{code}" for number, code in zip(atoms.res_id[starts], atoms.ins_code[starts], strict=True)
        ],
        plddt=plddt,
        chain=str(atoms.chain_id[0]),
        source=str(path),
    )


def align_structure_to_sequence(structure: ProteinStructure, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates for every residue of `sequence` (NaN where the structure has none) and their presence mask, from a
    global alignment with free end gaps, so a structure of a fragment lands on the right residues of the full chain."""
    check_sequence(sequence)
    if not structure.sequence:
        raise ValueError(f"{structure.source}: the structure has no residues to align")
    alignment = _aligner().align(_for_blosum(structure.sequence), _for_blosum(sequence))[0]
    indices = alignment.indices
    structure_index, sequence_index = indices[:, (indices >= 0).all(axis=0)]
    if structure_index.size == 0:
        identity = 0.0
    else:
        identity = float(
            np.mean(np.array(list(structure.sequence))[structure_index] == np.array(list(sequence))[sequence_index])
        )
    if identity < _MIN_IDENTITY:
        raise ValueError(
            f"{structure.source} chain {structure.chain}: the structure does not match the sequence (identity "
            f"{identity:.1%} over {structure_index.size} aligned residues, {_MIN_IDENTITY:.0%} required)"
        )
    coords = np.full((len(sequence), 3), np.nan, dtype=np.float32)
    coords[sequence_index] = structure.coords[structure_index]
    return coords, np.isfinite(coords).all(axis=-1)


def _is_cif(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(_CIF_SUFFIXES):
        return True
    if name.endswith(_PDB_SUFFIXES):
        return False
    raise ValueError(f"{path}: unknown structure file suffix; accepted: {_ACCEPTED}")


def file_kind(path: str | os.PathLike, noun: str = "file") -> str:
    """'file' (a regular file, or a link to one), 'folder', or why `path` is neither, for a message: no such `noun`,
    a broken link, a link loop, a pipe or device (reading one blocks, or never ends), or a name no file can have."""
    try:
        mode = os.stat(path).st_mode
    except UnicodeEncodeError:  # a lone surrogate, which no file name can hold
        return f"not a {noun} path (it holds a character the file system cannot encode)"
    except ValueError:  # os.stat refuses a NUL character before asking the OS
        return f"not a {noun} path (it contains a NUL character)"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop (the link leads back to itself), not a file"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if error.errno == errno.ENOENT:
            return f"no such {noun}"
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return f"a {_FILE_KINDS.get(stat.S_IFMT(mode), 'special file')}, not a regular file"


def _read_capped(handle: io.BufferedIOBase, path: Path) -> bytes:
    data = handle.read(MAX_STRUCTURE_BYTES + 1)
    if len(data) > MAX_STRUCTURE_BYTES:
        raise ValueError(
            f"{path}: more than {MAX_STRUCTURE_BYTES >> 20} MiB of structure text (MAX_STRUCTURE_BYTES); extract the "
            "chain you need into its own file"
        )
    return data


def read_structure_text(path: Path) -> str:
    """The text of a PDB/mmCIF file (gunzipped when it ends in .gz, without a byte-order mark), at most
    `MAX_STRUCTURE_BYTES` of it; a ValueError naming the file for anything that is not such text."""
    try:
        with open(path, "rb") as handle:
            if path.suffix.lower() != ".gz":
                data = _read_capped(handle, path)
            else:
                try:
                    with gzip.open(handle) as unpacked:
                        data = _read_capped(unpacked, path)
                except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
                    raise ValueError(f"{path}: corrupt or truncated gzip data ({error})") from error
    except OSError as error:
        raise ValueError(f"{path}: cannot read the structure file ({error})") from error
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some Windows editors write
    if not data.strip():
        raise ValueError(f"{path}: the structure file is empty")
    if b"\0" in data:
        raise ValueError(f"{path}: binary content (NUL bytes), not a PDB/mmCIF text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: binary content (not UTF-8 at byte {error.start}), not a PDB/mmCIF text file"
        ) from error


def _parse_pdb(text: str, path: Path) -> tuple[struc.AtomArray, bool]:
    try:
        pdb_file = pdb.PDBFile.read(io.StringIO(text))
        model_count = pdb_file.get_model_count()
    except Exception as error:
        raise ValueError(f"{path}: cannot parse as PDB ({type(error).__name__}: {error})") from error
    if model_count == 0:
        raise ValueError(f"{path}: no ATOM/HETATM records (no atoms), not a PDB structure")
    try:
        atoms = pdb_file.get_structure(model=1, altloc="first", extra_fields=["b_factor"])
    except Exception as error:
        raise ValueError(f"{path}: cannot read the atoms as PDB ({type(error).__name__}: {error})") from error
    return atoms, path.name.startswith("AF-") or _ALPHAFOLD_TITLE.search(text) is not None


def _parse_cif(text: str, path: Path) -> tuple[struc.AtomArray, bool]:
    try:
        block = pdbx.CIFFile.read(io.StringIO(text)).block
    except Exception as error:
        raise ValueError(f"{path}: cannot parse as mmCIF ({type(error).__name__}: {error})") from error
    if "atom_site" not in block:
        raise ValueError(f"{path}: no atom_site category (no atoms), not an mmCIF structure")
    try:
        atoms = pdbx.get_structure(block, model=1, altloc="first", extra_fields=["b_factor"], use_author_fields=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read the atoms as mmCIF ({type(error).__name__}: {error})") from error
    return atoms, path.name.startswith("AF-") or "ma_qa_metric" in block


def _select_chain(protein: struc.AtomArray, chain: str | None, path: Path) -> struc.AtomArray:
    chains = list(dict.fromkeys(protein.chain_id.tolist()))
    if not chains:
        raise ValueError(f"{path}: no protein chain (no amino-acid residues; waters, ligands and nucleic acids only)")
    if chain is None:
        if len(chains) > 1:
            raise ValueError(
                f"{path}: several protein chains ({', '.join(map(repr, chains))}); pass chain= to pick one"
            )
        chain = chains[0]
    elif chain not in chains:
        raise ValueError(
            f"{path}: no protein chain {chain!r} (author chain ids); available: {', '.join(map(repr, chains))}"
        )
    return protein[protein.chain_id == chain]


@cache
def _one_letter(res_name: str) -> str:
    """The CCD one-letter code, which maps modified residues to their parent (MSE -> M); X when there is none."""
    try:
        letter = one_letter_code(res_name)
    except Exception:  # a malformed residue name is simply an unknown residue
        letter = None
    return letter if letter in VALID_AMINO_ACIDS else "X"


def check_sequence(sequence: object, where: str = "sequence") -> str:
    """The sequence itself when it is non-empty uppercase one-letter amino-acid codes; else a ValueError naming `where`
    and the offending letters."""
    if not isinstance(sequence, str) or not sequence:
        raise ValueError(f"{where}: the sequence is empty or not a string; give one-letter amino-acid codes")
    invalid = [(i, letter) for i, letter in enumerate(sequence) if letter not in VALID_AMINO_ACIDS]
    if invalid:
        shown = ", ".join(f"{letter!r} at {i}" for i, letter in invalid[:5])
        more = f" and {len(invalid) - 5} more" if len(invalid) > 5 else ""
        raise ValueError(
            f"{where}: invalid amino-acid letters ({shown}{more}); use uppercase one-letter codes from "
            f"{''.join(sorted(VALID_AMINO_ACIDS))}"
        )
    return sequence


def _for_blosum(sequence: str) -> str:
    """BLOSUM62 has no U or O: score selenocysteine as cysteine and pyrrolysine as lysine, their closest relatives."""
    return sequence.translate(_BLOSUM_STAND_INS)


@cache
def _aligner() -> PairwiseAligner:
    # end_gap_score must come after the gap scores: their setters also set the end-gap scores.
    return PairwiseAligner(
        mode="global",
        substitution_matrix=substitution_matrices.load("BLOSUM62"),
        open_gap_score=-10.0,
        extend_gap_score=-0.5,
        end_gap_score=0.0,
    )
