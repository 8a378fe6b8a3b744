"""Structures for UniProt accessions: a folder of PDB / mmCIF / AlphaFold DB files indexed by the accessions they
declare, and C-alpha coordinates aligned onto an entry's full sequence.

Accessions come from what the files say about themselves, not from file names chosen by whoever copied them:
PDB `DBREF` records and mmCIF `struct_ref` / `struct_ref_seq` rows with database UNP (chain by chain), and the
`AF-<accession>-F<n>` name AlphaFold DB gives its models. Reading a header is cheap, so the index of a large folder
costs a small fraction of parsing every model; coordinates are parsed (by `modeling_sepit.structure_loading`) only
for accessions that are in the corpus.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from biotite.structure.io import pdbx

from modeling_sepit.structure_loading import align_structure_to_sequence, load_structure

logger = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
_ALPHAFOLD_NAME = re.compile(r"AF-([A-Z0-9]+(?:-\d+)?)-F\d+", re.IGNORECASE)


@dataclass(frozen=True)
class StructureRef:
    """One chain of one file that declares it holds (part of) an accession; `chain` None means the only chain."""

    path: Path
    chain: str | None
    predicted: bool


@dataclass(frozen=True)
class AttachedStructure:
    """C-alpha coordinates on the entry's own residues (zeros where unresolved) and which residues have them."""

    coords: np.ndarray
    coords_mask: np.ndarray
    source: str


def _is_structure_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().removesuffix(".gz").endswith(STRUCTURE_SUFFIXES)


def _open_text(path: Path) -> TextIO:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _pdb_references(handle: TextIO) -> Iterator[tuple[str, str]]:
    """(accession, chain) from `DBREF` records naming UniProt (PDB format v3.3 columns); stops at the first atom."""
    for line in handle:
        if line.startswith(("ATOM", "HETATM", "MODEL")):
            return
        if line.startswith("DBREF ") and line[26:32].strip() == "UNP":
            yield line[33:41].strip(), line[12].strip()


def _cif_references(handle: TextIO) -> Iterator[tuple[str, str]]:
    """(accession, author chain) from `struct_ref` rows of database UNP joined to `struct_ref_seq` by ref_id."""
    block = pdbx.CIFFile.read(handle).block
    if "struct_ref" not in block or "struct_ref_seq" not in block:
        return
    refs = block["struct_ref"]
    ref_ids = refs["id"].as_array(str)
    uniprot = {
        ref_id: accession
        for ref_id, database, accession in zip(
            ref_ids, refs["db_name"].as_array(str), refs["pdbx_db_accession"].as_array(str), strict=True
        )
        if database == "UNP"
    }
    rows = block["struct_ref_seq"]
    for ref_id, chain in zip(rows["ref_id"].as_array(str), rows["pdbx_strand_id"].as_array(str), strict=True):
        if ref_id in uniprot:
            yield uniprot[ref_id], chain


def file_references(path: Path) -> list[tuple[str, str | None]]:
    """Every (accession, chain) a structure file declares; an unreadable header is logged and gives nothing."""
    is_cif = path.name.lower().removesuffix(".gz").endswith((".cif", ".mmcif"))
    try:
        with _open_text(path) as handle:
            references: list[tuple[str, str | None]] = list(
                dict.fromkeys(_cif_references(handle) if is_cif else _pdb_references(handle))
            )
    except (OSError, ValueError, KeyError, EOFError) as error:
        logger.warning("%s: header not readable (%s); file not indexed", path, error)
        references = []
    name_match = _ALPHAFOLD_NAME.search(path.name)
    if name_match and not references:
        references = [(name_match.group(1).upper(), None)]
    return references


class StructureIndex:
    """Accession -> the structure chains that declare it, for a folder searched recursively."""

    def __init__(self, references: dict[str, list[StructureRef]]):
        self.references = references

    @classmethod
    def scan(cls, folder: str | Path) -> StructureIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"structures: {folder} is not a folder; give a folder of PDB/mmCIF/AlphaFold files")
        references: dict[str, list[StructureRef]] = defaultdict(list)
        for path in sorted(p for p in folder.rglob("*") if _is_structure_file(p)):
            predicted = bool(_ALPHAFOLD_NAME.search(path.name))
            for accession, chain in file_references(path):
                references[str(accession)].append(StructureRef(path, str(chain) if chain else None, predicted))
        return cls(dict(references))

    def __len__(self) -> int:
        return len(self.references)

    def __contains__(self, accession: object) -> bool:
        return accession in self.references

    def attach(self, accession: str, sequence: str) -> AttachedStructure | None:
        """The candidate that resolves the most residues of `sequence` (experimental before predicted on ties);
        None if the accession has no structure or none of its chains matches the sequence."""
        best: tuple[int, int, AttachedStructure] | None = None
        for ref in self.references.get(accession, ()):
            try:
                coords, mask = align_structure_to_sequence(load_structure(ref.path, ref.chain), sequence)
            except ValueError as error:
                logger.warning("%s: structure %s chain %s not used: %s", accession, ref.path.name, ref.chain, error)
                continue
            resolved = int(mask.sum())
            source = f"{ref.path.name}:{ref.chain}" if ref.chain else ref.path.name
            candidate = AttachedStructure(np.where(mask[:, None], coords, 0.0).astype(np.float32), mask, source)
            key = (resolved, int(not ref.predicted))
            if best is None or key > best[:2]:
                best = (*key, candidate)
        return best[2] if best else None
