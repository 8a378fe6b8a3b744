"""Entries per second and peak RSS of the instruction-dataset front end on a large gzipped UniProtKB flat file.

The real flat entries of dataset_card/data/uniprot (core + store) are repeated into one synthetic gzipped file of
N entries in a temporary folder, which is then streamed through `iter_entries` + `open_ended_questions` + `caption`.
Project goal: >= 2,000 entries/s and peak RSS < 2 GB. Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/dataset_parsing.py [--entries 100000] [--workers 2]

Peak RSS is reported for this process and for the largest worker process (`RUSAGE_CHILDREN`: children that have
ended, which the pool's workers have once `iter_entries` is exhausted); their sum with one worker peak per worker
is an upper bound of the memory the whole run held at once.
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
                text = path.read_text(encoding="utf-8")
                records += [record for record, done in split_flat_records([text]) if done and record.startswith("ID")]
    return records


def cpu_seconds() -> float:
    """User + system CPU time of this process and its ended children (the workers, once `iter_entries` is done)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1, help="processes parsing flat records (iter_entries)")
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
        load_before, cpu_before = os.getloadavg()[0], cpu_seconds()
        start = time.perf_counter()
        for entry in iter_entries(path, report, workers=args.workers):
            questions += len(open_ended_questions(entry, rng))
            caption_chars += len(caption(entry))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_before
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    total_mb = peak_mb + (child_mb * args.workers if args.workers > 1 else 0)
    print(f"read {report.total_read} entries, skipped {report.total_skipped}, {questions} questions")
    print(f"{caption_chars} caption characters, {os.cpu_count()} CPUs, {args.workers} worker(s)")
    print(f"{report.total_read / elapsed:.0f} entries/s ({elapsed:.1f} s), peak RSS {peak_mb:.0f} MB main")
    print(f"+ {child_mb:.0f} MB largest worker: at most {total_mb:.0f} MB in all")
    print(f"CPU {cpu:.1f} s (this process + workers): {report.total_read / cpu:.0f} entries per CPU-second")
    print(f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other jobs share the CPUs)")


if __name__ == "__main__":
    main()
