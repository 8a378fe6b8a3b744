"""Structure files parsed per second: `load_structure` (biotite, one chain of the first model, C-alpha per residue)
against Biopython's `PDBParser` / `MMCIFParser` building the full structure (all models, chains and atoms), on every
file in tests/fixtures/structures.

Each round parses every file once; the figures are medians over the rounds. One untimed warm-up round comes first, so
that one-time costs (imports, biotite loading its chemical component dictionary) are not counted; that first-call cost
is reported separately, and so is the load average. Usage, from the repository root::

    .venv/bin/python benchmarks/structure_parsing.py [--rounds 5]
"""

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import Bio
import biotite
from Bio.PDB import MMCIFParser, PDBParser

from modeling_sepit.structure_loading import load_structure

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = ROOT / "tests" / "fixtures" / "structures"
# Files with several protein chains need a chain for load_structure; all of these have a chain A.
MULTI_CHAIN = {
    "EMBOSS__2hhb.ent",
    "graphein__4hhb.pdb",
    "graphein__4hhb.cif",
    "biopython__2BEG.pdb",
    "biopython__2BEG.cif",
}


def load_with_sepit(path: Path) -> None:
    load_structure(path, chain="A" if path.name in MULTI_CHAIN else None)


def load_with_biopython(path: Path) -> None:
    parser = MMCIFParser(QUIET=True) if path.suffix == ".cif" else PDBParser(QUIET=True)
    parser.get_structure(path.stem, path)


def time_rounds(load: Callable[[Path], None], files: list[Path], rounds: int) -> list[dict[str, float]]:
    """Seconds per file for each round (a warm-up round first, not returned)."""
    for path in files:
        load(path)
    timings = []
    for _ in range(rounds):
        seconds = {}
        for path in files:
            start = time.perf_counter()
            load(path)
            seconds[path.name] = time.perf_counter() - start
        timings.append(seconds)
    return timings


def first_call_seconds() -> float:
    """load_structure's first call in this interpreter: CCD loading included (measured before anything else)."""
    start = time.perf_counter()
    load_structure(STRUCTURES / "biotite__1aki.pdb")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Biopython/biotite warnings about the fixture files are not what is measured here

    files = sorted(path for path in STRUCTURES.iterdir() if path.suffix in {".pdb", ".ent", ".cif"})
    groups = {
        "all files": files,
        "PDB (.pdb, .ent)": [path for path in files if path.suffix != ".cif"],
        "mmCIF (.cif)": [path for path in files if path.suffix == ".cif"],
    }
    load_before = os.getloadavg()[0]  # other work on the machine slows both parsers; recorded with the figures
    first_call = first_call_seconds()
    results = {
        "`load_structure` (biotite)": time_rounds(load_with_sepit, files, args.rounds),
        "Biopython `PDBParser`/`MMCIFParser`": time_rounds(load_with_biopython, files, args.rounds),
    }

    megabytes = {name: sum(path.stat().st_size for path in group) / 1e6 for name, group in groups.items()}
    print("| parser | files | n | MB | median s per round | files/s | MB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    medians = {}
    for parser_name, timings in results.items():
        for group_name, group in groups.items():
            seconds = statistics.median(sum(round_[path.name] for path in group) for round_ in timings)
            medians[parser_name, group_name] = seconds
            print(
                f"| {parser_name} | {group_name} | {len(group)} | {megabytes[group_name]:.1f} | {seconds:.3f} "
                f"| {len(group) / seconds:.1f} | {megabytes[group_name] / seconds:.1f} |"
            )
    sepit, biopython = results
    ratio = medians[biopython, "all files"] / medians[sepit, "all files"]
    print()
    print(
        f"`load_structure` parses {ratio:.1f}x as many files per second as Biopython over all files. Its first call in "
        f"an interpreter ({first_call:.2f} s: biotite loads its chemical component dictionary) is not counted."
    )
    print()
    print(
        f"Medians of {args.rounds} rounds after a warm-up round. Machine: {platform.machine()} CPU, `os.cpu_count()` = "
        f"{os.cpu_count()}, Python {platform.python_version()}, biotite {biotite.__version__}, "
        f"Biopython {Bio.__version__}, Linux {platform.release()}; 1-minute load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after."
    )


if __name__ == "__main__":
    main()
