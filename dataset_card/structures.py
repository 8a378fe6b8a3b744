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
import io
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from biotite.structure.io import pdbx

from dataset_card.uniprot_reader import ReadReport
from modeling_sepit.structure_loading import (
    align_structure_to_sequence,
    file_kind,
    load_structure,
    read_structure_text,
)

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


def _has_structure_suffix(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(STRUCTURE_SUFFIXES)


def _open_text(path: Path) -> TextIO:
    """A PDB file's lines, read lazily (only its header is needed); 'utf-8-sig' drops a byte-order mark."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


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


def file_references(path: Path, report: ReadReport | None = None) -> list[tuple[str, str | None]]:
    """Every (accession, chain) a structure file declares; an unreadable header gives nothing and is reported."""
    is_cif = path.name.lower().removesuffix(".gz").endswith((".cif", ".mmcif"))
    try:
        if is_cif:  # read whole by the structure reader: its size cap holds for a gzip bomb too
            found = _cif_references(io.StringIO(read_structure_text(path)))
            references: list[tuple[str, str | None]] = list(dict.fromkeys(found))
        else:
            with _open_text(path) as handle:
                references = list(dict.fromkeys(_pdb_references(handle)))
    except Exception as error:  # noqa: BLE001 - corrupt gzip, broken CIF, ...: this file only is left out
        if report is not None:
            report.skip(str(path), "structure header", f"not indexed: {type(error).__name__}: {error}")
        return []  # not even by an AlphaFold name: its coordinates could not be read either
    name_match = _ALPHAFOLD_NAME.search(path.name)
    if name_match and not references:
        references = [(name_match.group(1).upper(), None)]
    return references


class StructureIndex:
    """Accession -> the structure chains that declare it, for a folder searched recursively."""

    def __init__(self, references: dict[str, list[StructureRef]], report: ReadReport | None = None):
        self.references = references
        self.report = report

    @classmethod
    def scan(cls, folder: str | Path, report: ReadReport | None = None) -> StructureIndex:
        """Index `folder`; files that cannot be read (corrupt gzip, broken header, a link to nowhere, a named pipe)
        go to `report`, as do the candidates `attach` later rejects."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"structures: {folder} is not a folder; give a folder of PDB/mmCIF/AlphaFold files")
        references: dict[str, list[StructureRef]] = defaultdict(list)
        for path in sorted(p for p in folder.rglob("*") if _has_structure_suffix(p)):
            kind = file_kind(path)
            if kind != "file":
                if kind != "folder" and report is not None:
                    report.skip(str(path), "structure file", kind)
                continue
            predicted = bool(_ALPHAFOLD_NAME.search(path.name))
            for accession, chain in file_references(path, report):
                references[str(accession)].append(StructureRef(path, str(chain) if chain else None, predicted))
        return cls(dict(references), report)

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
                if self.report is not None:
                    self.report.skip(str(ref.path), f"chain {ref.chain or '-'} for {accession}", f"not used: {error}")
                continue
            resolved = int(mask.sum())
            source = f"{ref.path.name}:{ref.chain}" if ref.chain else ref.path.name
            candidate = AttachedStructure(np.where(mask[:, None], coords, 0.0).astype(np.float32), mask, source)
            key = (resolved, int(not ref.predicted))
            if best is None or key > best[:2]:
                best = (*key, candidate)
        return best[2] if best else None
