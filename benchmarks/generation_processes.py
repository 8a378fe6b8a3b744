"""Generation speed of `training/generate.py` in 2 data-parallel processes (torchrun, CPU/gloo) against 1 process, on
the same rows and the same answers (checked equal): 1 process with `--threads` threads, 1 process with half of them
(on a loaded machine OpenMP threads that wait for each other can cost more than they give), 2 processes with half
each. Each setting runs `--repeats` times in fresh output folders, alternating; reported: the median wall
time of the whole command (launch, imports, loading, generation, writing), and of its generation alone (the slowest
process's `generate_answers` call, timed by a wrapper around the command: the merge waits for it). A tiny SEPIT folder
is assembled from the parts first. Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/generation_processes.py --parts outputs/main/parts \\
        --dataset outputs/main/dataset
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor

ROOT = Path(__file__).resolve().parents[1]
# Runs training/generate.py with `generate_answers` timed; each process writes its seconds to $TIMINGS/<rank>.
TIMED_WRAPPER = """
import os, runpy, sys, time
from modeling_sepit import evaluation_sepit
generate_answers = evaluation_sepit.generate_answers
def timed(*args, **kwargs):
    start = time.perf_counter()
    answers = generate_answers(*args, **kwargs)
    with open(os.path.join(os.environ["TIMINGS"], os.environ.get("RANK", "0")), "w") as handle:
        handle.write(str(time.perf_counter() - start))
    return answers
evaluation_sepit.generate_answers = timed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_model(parts: Path, folder: Path, max_protein_length: int) -> None:
    """An untrained SEPIT folder from the tiny parts (what evaluation tests generate with)."""
    processor = SepitProcessor.from_pretrained_parts(parts / "protein_model", parts / "language_model")
    processor.max_protein_length = max_protein_length
    torch.manual_seed(0)
    model = SepitForConditionalGeneration.from_pretrained_parts(
        parts / "protein_model", parts / "language_model", protein_token_id=processor.protein_token_id
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def timed_run(processes: int, threads: int, arguments: list[str], work: Path, port: int) -> tuple[float, float]:
    """Wall seconds of one `training/generate.py` command in `processes` processes of `threads` threads each, and of
    its generation."""
    timings = Path(tempfile.mkdtemp(dir=work))
    wrapper = work / "timed.py"
    wrapper.write_text(TIMED_WRAPPER)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([*launcher, str(wrapper), str(ROOT / "training" / "generate.py"), *arguments],
                   env={**env, "TIMINGS": str(timings)}, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    whole = time.perf_counter() - start
    return whole, max(float(path.read_text()) for path in timings.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --parts PARTS --dataset DATASET [--rows N] [--name value ...]",
    )
    parser.add_argument("--parts", required=True, type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_protein_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        build_model(args.parts, work / "model", args.max_protein_length)
        common = ["--model_name_or_path", str(work / "model"), "--dataset_name", args.dataset, "--split", args.split]
        common += ["--max_samples", str(args.rows), "--batch_size", str(args.batch_size)]
        common += ["--max_new_tokens", str(args.max_new_tokens)]
        half = max(1, args.threads // 2)
        settings = ((1, args.threads), (1, half), (2, half))  # (processes, threads each)
        whole: dict[tuple[int, int], list[float]] = {setting: [] for setting in settings}
        generation: dict[tuple[int, int], list[float]] = {setting: [] for setting in settings}
        for repeat in range(args.repeats):
            for index, (processes, threads) in enumerate(settings):
                arguments = [*common, "--output_dir", str(work / f"run-{index}-{repeat}")]
                total, generating = timed_run(processes, threads, arguments, work, 29600 + repeat)
                whole[processes, threads].append(total)
                generation[processes, threads].append(generating)
        runs = [work / f"run-{n}-{r}" for n in range(len(settings)) for r in range(args.repeats)]
        answers = {(run / "predictions.jsonl").read_text() for run in runs}
        assert len(answers) == 1, "2 processes answered differently from 1"
    print(f"{args.rows} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens at most, "
          f"medians of {args.repeats} runs")  # fmt: skip
    print("| processes x threads | whole command s | generation s | questions/s (generation) | 2 processes faster by |")
    print("|---|---:|---:|---:|---:|")
    medians = {key: (statistics.median(whole[key]), statistics.median(generation[key])) for key in settings}
    two = medians[2, half][1]
    for (processes, threads), (total, generating) in medians.items():
        rate = args.rows / generating
        print(f"| {processes} x {threads} | {total:.1f} | {generating:.1f} | {rate:.2f} | {generating / two:.2f}x |")


if __name__ == "__main__":
    main()
