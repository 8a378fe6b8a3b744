"""Peak RSS and time to the first step of stage 1 (`training/sft.py`) on a 1,000,000-row dataset, streamed
(`--streaming true`) against loaded into memory (the default), same model, same arguments, same run.

The dataset is synthetic but shaped like Swiss-Prot captions: the SEPIT `captions` layout and features (copied from
the bundled demo dataset's Parquet schema), sequences of log-normal length (median 290, mean ~360 residues, 30-3000,
Swiss-Prot's amino-acid frequencies), C-alpha coordinates (a 3.8 A random walk) for a fraction of the proteins, and
captions/questions recombined from the demo's real sentences, in Parquet row groups of 1,000 rows (what
`Dataset.to_parquet` writes). The model is the tiny CPU parts (`training/build_tiny_parts.py` on the demo dataset).

Each path runs as its own process (`ru_maxrss` from `os.wait4`, the whole process's high-water mark); the in-memory
one starts from an empty `HF_DATASETS_CACHE`, as a first run does: `load_dataset` first converts the Parquet files into
an Arrow copy there (its size is reported), then memory-maps it. Time to first step: from the process's start to the
end of its first `training_step`. Both paths use `train_sampling_strategy: random` (the in-memory sampler against the
stream's buffer shuffle of `shuffle_buffer_size` rows); length grouping, the recipe's choice in memory, is refused with
streaming and is not timed here.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/streaming_memory.py --work_dir /tmp/streaming-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PATHS = ("in memory", "streaming")
# Swiss-Prot's amino-acid composition (UniProtKB/Swiss-Prot release statistics, percent).
AMINO_ACIDS = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07, "H": 2.27, "I": 5.96,
    "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56, "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}  # fmt: skip
ROW_GROUP_ROWS = 1000
CHUNK_ROWS = 20_000
# Runs `training/sft.py` (argv[1:]) and writes the time at which its first training step ended to $FIRST_STEP_FILE.
WORKER = """
import os, runpy, sys, time
from modeling_sepit.training_sepit import SepitSFTTrainer

train_step = SepitSFTTrainer.training_step

def timed(self, *args, **kwargs):
    loss = train_step(self, *args, **kwargs)
    if not os.path.exists(os.environ["FIRST_STEP_FILE"]):
        with open(os.environ["FIRST_STEP_FILE"], "w") as out:
            out.write(repr(time.time()))
    return loss

SepitSFTTrainer.training_step = timed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def demo_dataset_and_parts(work_dir: Path) -> tuple[Path, Path]:
    """The bundled demo dataset and the tiny parts trained on it (built once in `work_dir`)."""
    dataset, parts = work_dir / "demo-dataset", work_dir / "tiny-parts"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    if not (dataset / "README.md").is_file():
        store = REPO_ROOT / "dataset_card" / "data" / "uniprot" / "uniprot_flat_store"
        command = [sys.executable, "-m", "dataset_card.build_dataset", "--output_dir", str(dataset)]
        subprocess.run([*command, "--uniprot", str(store)], check=True, cwd=REPO_ROOT, env=env)
    if not (parts / "language_model").is_dir():
        command = [sys.executable, "training/build_tiny_parts.py", "--dataset_dir", str(dataset)]
        subprocess.run([*command, "--output_dir", str(parts)], check=True, cwd=REPO_ROOT, env=env)
    return dataset, parts


def write_synthetic_dataset(demo: Path, output: Path, rows: int, coords_fraction: float, seed: int) -> Path:
    """`rows` Swiss-Prot-like caption rows in the demo dataset's `captions` layout (see the module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = output / "captions" / "train-00000-of-00001.parquet"
    if target.is_file() and pq.ParquetFile(target).metadata.num_rows == rows:
        return output
    template = pq.read_table(demo / "captions" / "train-00000-of-00001.parquet")
    schema = template.schema
    demo_rows = template.to_pylist()
    sentences = sorted({s.strip() + "." for row in demo_rows for s in row["caption"].split(". ")[1:] if s.strip()})
    questions = sorted({row["messages"][0]["content"] for row in demo_rows})
    names = sorted({(row["protein_name"], row["organism"]) for row in demo_rows})
    letters = np.frombuffer("".join(AMINO_ACIDS).encode(), dtype=np.uint8)
    frequencies = np.array(list(AMINO_ACIDS.values()))
    frequencies /= frequencies.sum()
    rng = np.random.default_rng(seed)
    output.mkdir(parents=True, exist_ok=True)
    (output / "captions").mkdir(exist_ok=True)
    (output / "README.md").write_text(
        "---\nconfigs:\n- config_name: captions\n  data_files:\n  - split: train\n"
        "    path: captions/train-*.parquet\n---\nSynthetic Swiss-Prot-like caption rows "
        "(benchmarks/streaming_memory.py)\n"
    )
    partial = target.with_suffix(".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, rows - start)
            lengths = np.clip(rng.lognormal(np.log(290), 0.65, count).astype(int), 30, 3000)
            residues = rng.choice(letters, size=int(lengths.sum()), p=frequencies).tobytes().decode()
            ends = np.cumsum(lengths)
            sequences = [residues[end - length : end] for end, length in zip(ends, lengths, strict=True)]
            structured = rng.random(count) < coords_fraction
            steps = rng.normal(size=(int(lengths[structured].sum()), 3)).astype(np.float32)
            steps *= 3.8 / np.linalg.norm(steps, axis=1, keepdims=True)
            coords_offsets = np.concatenate([[0], np.cumsum(np.where(structured, lengths, 0))]).astype(np.int32)
            walks = np.cumsum(steps, axis=0)  # one walk through every structure of the chunk: fine for the bytes
            coords = pa.ListArray.from_arrays(
                pa.array(coords_offsets),
                pa.FixedSizeListArray.from_arrays(pa.array(walks.reshape(-1)), 3),
                mask=pa.array(~structured),
            )
            masks = pa.ListArray.from_arrays(
                pa.array(coords_offsets),
                pa.array(np.ones(int(lengths[structured].sum()), dtype=bool)),
                mask=pa.array(~structured),
            )
            picked = rng.integers(len(names), size=count)
            captions = [
                f"{names[p][0]} is a protein from {names[p][1]}. "
                + " ".join(rng.choice(sentences, size=int(rng.integers(2, 6))))
                for p in picked
            ]
            asked = rng.choice(questions, size=count)
            accessions = [f"S{start + i:07d}" for i in range(count)]
            table = pa.Table.from_arrays(
                [
                    pa.array(accessions),
                    pa.array(sequences),
                    coords,
                    masks,
                    pa.array([f"AF-{a}-F1" if s else None for a, s in zip(accessions, structured, strict=True)]),
                    pa.array([names[p][0] for p in picked]),
                    pa.array([names[p][1] for p in picked]),
                    pa.array(captions),
                    pa.array(
                        [
                            [{"role": "user", "content": question}, {"role": "assistant", "content": caption}]
                            for question, caption in zip(asked, captions, strict=True)
                        ],
                        type=schema.field("messages").type,
                    ),
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    os.replace(partial, target)
    return output


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_stage1(streaming: bool, dataset: Path, parts: Path, work_dir: Path, args: argparse.Namespace) -> dict:
    """One stage-1 run in its own process: peak RSS (MiB), seconds to the end of the first step, total seconds, and
    for the in-memory path the size of the Arrow copy that `load_dataset` wrote."""
    name = "stream" if streaming else "memory"
    output_dir, cache = work_dir / f"run-{name}", work_dir / f"cache-{name}"
    first_step = work_dir / f"first-step-{name}.txt"
    for path in (output_dir, cache, first_step):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    argv = [
        sys.executable, "-c", WORKER, str(REPO_ROOT / "training" / "sft.py"),
        "--config", str(REPO_ROOT / "training" / "recipes" / "tiny" / "stage1.yaml"),
        "--dataset_name", str(dataset),
        "--protein_model_name_or_path", str(parts / "protein_model"),
        "--language_model_name_or_path", str(parts / "language_model"),
        "--encoder_warmup_dir", "",
        "--train_sampling_strategy", "random",
        "--max_steps", str(args.steps), "--save_steps", str(args.steps), "--logging_steps", "50",
        "--output_dir", str(output_dir),
        "--streaming", str(streaming).lower(), "--shuffle_buffer_size", str(args.shuffle_buffer_size),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
        "FIRST_STEP_FILE": str(first_step),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    start = time.time()
    with open(work_dir / f"log-{name}.txt", "w") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the {name} run failed; see {work_dir / f'log-{name}.txt'}")
    result = {
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "first_step_s": float(first_step.read_text()) - start,
        "total_s": seconds,
        "arrow_cache_mib": folder_bytes(cache) / 2**20 if cache.is_dir() else 0.0,
    }
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True, help="Folder for the dataset, parts and runs.")
    parser.add_argument("--rows", type=int, default=1_000_000, help="Rows of the synthetic dataset.")
    parser.add_argument("--coords_fraction", type=float, default=0.1, help="Fraction of proteins with coordinates.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps per run.")
    parser.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="The stream's shuffle buffer.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each path (medians reported).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.steps < 1 or args.repeats < 1 or not 0 <= args.coords_fraction <= 1:
        parser.error("--rows, --steps and --repeats must be >= 1 and --coords_fraction in [0, 1]")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    demo, parts = demo_dataset_and_parts(args.work_dir)
    started = time.time()
    dataset = write_synthetic_dataset(demo, args.work_dir / "synthetic", args.rows, args.coords_fraction, args.seed)
    parquet = folder_bytes(dataset / "captions") / 2**20
    print(f"dataset: {args.rows:,} rows, {parquet:.0f} MiB of Parquet ({time.time() - started:.0f} s)", flush=True)
    runs: dict[str, list[dict]] = {path: [] for path in PATHS}
    for repeat in range(args.repeats):
        for path in PATHS:  # interleaved: a drift in the machine's load touches both alike
            runs[path].append(run_stage1(path == "streaming", dataset, parts, args.work_dir, args))
            print(f"run {repeat + 1}/{args.repeats}, {path}: {json.dumps(runs[path][-1])}", flush=True)
    print(f"\nstage 1, {args.steps} steps, {args.rows:,} rows; medians of {args.repeats} run(s) per path\n")
    print("| path | peak RSS (MiB) | time to first step (s) | total (s) | Arrow copy on disk (MiB) |")
    print("|---|---|---|---|---|")
    for path in PATHS:
        median = {key: statistics.median(run[key] for run in runs[path]) for key in runs[path][0]}
        print(
            f"| {path} | {median['peak_rss_mib']:.0f} | {median['first_step_s']:.1f} | {median['total_s']:.1f} | "
            f"{median['arrow_cache_mib']:.0f} |"
        )
    (args.work_dir / "results.json").write_text(
        json.dumps({"args": vars(args) | {"work_dir": str(args.work_dir)}, "runs": runs}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
