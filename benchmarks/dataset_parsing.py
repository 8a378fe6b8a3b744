"""Entries per second and peak RSS of the instruction-dataset front end on a large gzipped UniProtKB flat file.

The real flat entries of dataset_card/data/uniprot (core + store) are repeated into one synthetic gzipped file of
N entries in a temporary folder, which is then streamed through `iter_entries` + `open_ended_questions` + `caption`.
Project goal: >= 2,000 entries/s and peak RSS < 2 GB. Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/dataset_parsing.py [--entries 100000]
"""

import argparse
import gzip
import itertools
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from dataset_card.instructions import caption, open_ended_questions
from dataset_card.uniprot_reader import ReadReport, iter_entries, split_flat_records

ROOT = Path(__file__).resolve().parent.parent
FLAT = [ROOT / "dataset_card" / "data" / "uniprot" / d for d in ("uniprot_flat_core", "uniprot_flat_store")]
SUFFIXES = {".dat", ".txt", ".txl", ".sp"}


def real_records() -> list[str]:
    """Every well-formed flat record of the demo corpus (the deliberately broken test records are left out)."""
    records = []
    for folder in FLAT:
        for path in sorted(folder.iterdir()):
            if path.suffix in SUFFIXES:
                with path.open(encoding="utf-8") as handle:
                    records += [text for text, done in split_flat_records(handle) if done and text.startswith("ID")]
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    records = real_records()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic.dat.gz"
        start = time.perf_counter()
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
            for text in itertools.islice(itertools.cycle(records), args.entries):
                handle.write(text)
        size_mb = path.stat().st_size / 1e6
        print(f"built {args.entries} entries ({size_mb:.1f} MB gzipped) in {time.perf_counter() - start:.1f} s")
        rng, report, questions, caption_chars = random.Random(0), ReadReport(), 0, 0
        start = time.perf_counter()
        for entry in iter_entries(path, report):
            questions += len(open_ended_questions(entry, rng))
            caption_chars += len(caption(entry))
        elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"read {report.total_read} entries, skipped {report.total_skipped}, {questions} questions")
    print(f"{caption_chars} caption characters, {os.cpu_count()} CPUs")
    print(f"{report.total_read / elapsed:.0f} entries/s ({elapsed:.1f} s), peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
