"""Rows per second and peak RSS of the SEPIT-Data importer on a synthetic release of N stage-2 rows.

The fixture release (tests/fixtures/sepit-data/database) is copied into a temporary folder with its
stage2/train.jsonl repeated to N rows (its other files as they are), then imported by the command a user runs,
`python -m dataset_card.import_sepit_data`, in a child process (its own peak RSS, from `os.wait4`). Baselines, in the
same run: the least any importer does, `json.loads` of every line of the same files, and the peak RSS of a process
that only imports the importer (torch and transformers come with the project's modules). Usage, from the repository
root::

    PYTHONPATH=. .venv/bin/python benchmarks/import_sepit_data.py [--rows 1000000]

Memory should not grow with N (lines are streamed, structures read on demand, Parquet written in batches): run with
two values of --rows to see it.
"""

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "tests" / "fixtures" / "sepit-data" / "database"


def synthetic_release(folder: Path, rows: int) -> int:
    """The fixture with stage2/train.jsonl repeated to `rows` lines; returns the stage-2 rows of the whole release."""
    shutil.copytree(RELEASE, folder)
    for path in folder.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    train = folder / "stage2" / "train.jsonl"
    lines = [line for line in train.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    with train.open("w", encoding="utf-8") as handle:
        handle.writelines(itertools.islice(itertools.cycle(lines), rows))
    return sum(1 for path in folder.glob("stage2/*.jsonl") for line in path.open(encoding="utf-8") if line.strip())


def json_baseline(folder: Path) -> tuple[int, float]:
    """(lines, seconds) for `json.loads` of every line of every release file."""
    start, count = time.perf_counter(), 0
    for path in sorted(folder.glob("stage*/*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                json.loads(line)
                count += 1
    return count, time.perf_counter() - start


def run_child(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process, run from the repository root, offline."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait for it again
    if child.returncode:
        raise SystemExit(f"{command} exited {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="stage2/train.jsonl rows of the synthetic release")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "database"
        stage2_rows = synthetic_release(folder, args.rows)
        size_mb = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6
        print(f"synthetic release: {stage2_rows} stage-2 rows, {size_mb:.0f} MB")
        lines, baseline_s = json_baseline(folder)
        print(f"baseline json.loads: {lines} lines in {baseline_s:.1f} s = {lines / baseline_s:,.0f} rows/s")
        load_before = os.getloadavg()[0]
        _, floor_mb = run_child([sys.executable, "-c", "import dataset_card.import_sepit_data"])
        command = [sys.executable, "-m", "dataset_card.import_sepit_data", "--input_dir", str(folder)]
        elapsed, peak_mb = run_child([*command, "--output_dir", str(Path(scratch) / "imported")])
        parquet_mb = sum(path.stat().st_size for path in (Path(scratch) / "imported").rglob("*.parquet")) / 1e6
    print(f"import: {lines} rows in {elapsed:.1f} s = {lines / elapsed:,.0f} rows/s (process start, audit and card")
    print(f"included), {parquet_mb:.0f} MB of Parquet; peak RSS of the import process {peak_mb:.0f} MB, of a process")
    print(f"that only imports the importer {floor_mb:.0f} MB")
    print(f"import / baseline time: {elapsed / baseline_s:.1f}x")
    print(f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other jobs share the CPUs)")


if __name__ == "__main__":
    main()
