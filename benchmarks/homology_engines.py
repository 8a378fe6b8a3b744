"""Wall time and peak RSS of the two homology-clustering engines of the dataset builder, and a projection to Swiss-Prot.

Engines: `pyopal` (dataset_card.homology.cluster_by_identity: all-pairs overlap alignment with exact bounds) and
`mmseqs` (dataset_card.mmseqs.cluster_with_mmseqs: easy-linclust + easy-search + pyopal for fragments). Corpora of N
real-length proteins are families of mutated copies: each family's root is a real sequence of the bundled demo corpus
(dataset_card/data: UniProt entries and the InstructProtein test sets, ~4,900 distinct sequences of 2 to 2,000
residues; a base used again is first re-substituted at 70% of its positions, so that roots stay unrelated), and its
members are copies at 30-95% identity to the root (substitutions drawn from the corpus' composition, plus short
indels); family sizes follow a Pareto law (mean ~6, capped at 200): the 50% clusters are then as numerous as
Swiss-Prot's (~570k sequences in roughly 100k UniRef50-like clusters).

Each (engine, N) runs in its own child process, with a time limit: wall time of the clustering call; peak RSS of the
child (`RUSAGE_SELF` in the child; `import_rss_mb` is its peak after the imports, before clustering: the package
imports torch) and of the largest process it started (MMseqs2; `RUSAGE_CHILDREN` in the child, read once they have
ended); their sum bounds what both held at once. A point that does not finish within the limit
is reported as such. The projection to 570,000 fits time = a * N^b (least squares on log-log) over each engine's
measured points; a point whose projection from the smaller ones exceeds twice the limit is not run but projected (and
marked so). With `--audit N`, the MMseqs2 clusters of the N-protein corpus are split (80/10/10) and pyopal measures
the largest test-to-train and validation-to-train identity exhaustively: the check that the 50% rule held. Usage, from
the repository root (run under the shared lock)::

    flock /tmp/heavy.lock env PYTHONPATH=. .venv/bin/python benchmarks/homology_engines.py \\
        --sizes 500 1000 2000 10000 50000 --limit 600 --audit 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "dataset_card" / "data"
SWISS_PROT = 570_000
MAX_BASE_LENGTH = 2000
THRESHOLD = 0.5


def real_sequences() -> list[str]:
    """Distinct sequences of the bundled corpus (UniProt entries, InstructProtein test sets), up to 2,000 residues."""
    from dataset_card.uniprot_reader import iter_entries

    found: dict[str, None] = {}
    for folder in sorted((DATA / "uniprot").iterdir()):
        for entry in iter_entries(folder):
            found.setdefault(entry.sequence)
    instruct = DATA / "instructprotein"
    for line in (instruct / "InstructProtein__test_mf.lm.json").read_text().splitlines():
        found.setdefault(json.loads(line)["sequence"])
    for line in (instruct / "InstructProtein__test.txt").read_text().splitlines():
        if line.strip():
            found.setdefault(line.split()[0])
    return [s for s in found if s.isalpha() and len(s) <= MAX_BASE_LENGTH]


def mutate(sequence: str, identity: float, letters: str, rng: random.Random) -> str:
    """A copy with about `identity` of its residues kept: substitutions from the corpus' composition, and one short
    indel (1-5 residues) per 50 residues on average."""
    out = []
    for residue in sequence:
        if rng.random() < 1 / 50:
            if rng.random() < 0.5:
                continue  # deletion
            out.extend(rng.choice(letters) for _ in range(rng.randint(1, 5)))  # insertion
        out.append(residue if rng.random() < identity else rng.choice(letters))
    return "".join(out) or sequence


def corpus(size: int, bases: list[str], seed: int = 0) -> list[str]:
    """`size` proteins in families of mutated copies (see the module doc), shuffled."""
    rng = random.Random(seed)
    letters = "".join(bases)  # drawing a letter from the concatenation follows the corpus' composition
    order = list(range(len(bases)))
    rng.shuffle(order)
    proteins: list[str] = []
    family = 0
    while len(proteins) < size:
        base = bases[order[family % len(order)]]
        root = base if family < len(order) else mutate(base, 0.3, letters, rng)
        members = min(200, int(rng.paretovariate(1.2)), size - len(proteins))
        proteins.append(root)
        proteins.extend(mutate(root, rng.uniform(0.3, 0.95), letters, rng) for _ in range(members - 1))
        family += 1
    rng.shuffle(proteins)
    return proteins


def worker(engine: str, fasta: str) -> None:
    """Child process: cluster the FASTA with one engine and print one JSON line of what was measured."""
    sequences = [line.strip() for line in Path(fasta).read_text().splitlines() if not line.startswith(">")]
    if engine == "mmseqs":
        from dataset_card.mmseqs import cluster_with_mmseqs as cluster
    else:
        from dataset_card.homology import cluster_by_identity as cluster
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    clusters = cluster(sequences, threshold=THRESHOLD)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "import_rss_mb": imported,
                "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "children_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "clusters": len(set(clusters)),
                "cluster_ids": clusters,
            }
        )
    )


def measure(engine: str, fasta: Path, limit: float) -> dict:
    """One (engine, corpus) point in a fresh child process; {"timeout": limit} when it ran out of time."""
    command = [sys.executable, __file__, "--worker", engine, str(fasta)]
    # its own process group, so that a timeout also stops the MMseqs2 process it started
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"timeout": limit}
    if child.returncode:
        raise RuntimeError(f"{engine} on {fasta.name} failed with exit code {child.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def audit(sequences: list[str], cluster_ids: list[int]) -> dict:
    """Split the clusters 80/10/10 (seed 0) and measure each held-out split against train with pyopal, exhaustively."""
    from dataset_card.homology import max_cross_identity, split_clusters

    splits = split_clusters(cluster_ids, (0.8, 0.1, 0.1), seed=0)
    train = [s for s, split in zip(sequences, splits, strict=True) if split == "train"]
    found = {}
    for held_out in ("validation", "test"):
        queries = [s for s, split in zip(sequences, splits, strict=True) if split == held_out]
        cross = max_cross_identity(queries, train, threshold=THRESHOLD)
        found[held_out] = {"max_identity": cross.max_identity, "exact": cross.exact, "pairs": cross.pairs}
    return found


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(a, b) of time = a * N^b by least squares on log-log; None with fewer than two points."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - b * mx), b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "FASTA"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 10000, 50000])
    parser.add_argument("--engines", nargs="+", default=["mmseqs", "pyopal"], choices=["mmseqs", "pyopal"])
    parser.add_argument("--repeats", type=int, default=3, help="Runs per point (the median is reported).")
    parser.add_argument("--repeat_up_to", type=int, default=2000, help="Larger N run once.")
    parser.add_argument("--limit", type=float, default=600, help="Seconds one run may take before it is stopped.")
    parser.add_argument("--audit", type=int, metavar="N", help="Check the 50%% rule on the MMseqs2 split at this N.")
    parser.add_argument("--output", type=Path, help="Append one JSON line per run to this file.")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    sys.path.insert(0, str(ROOT))
    bases = real_sequences()
    print(f"{len(bases)} distinct real sequences as family roots", flush=True)
    measured: dict[str, list[tuple[int, float]]] = {engine: [] for engine in args.engines}

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.output:
            with args.output.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    stopped = set()
    with tempfile.TemporaryDirectory(prefix="homology-bench-") as work:
        for size in args.sizes:
            sequences = corpus(size, bases)
            fasta = Path(work) / f"corpus-{size}.fasta"
            fasta.write_text("".join(f">{k}\n{s}\n" for k, s in enumerate(sequences)))
            lengths = sorted(map(len, sequences))
            for engine in args.engines:
                fitted = fit(measured[engine])
                if engine in stopped or (fitted and fitted[0] * size ** fitted[1] > 2 * args.limit):
                    emit(
                        {"engine": engine, "size": size, "projected_seconds": fitted and fitted[0] * size ** fitted[1]}
                    )
                    continue
                repeats = args.repeats if size <= args.repeat_up_to else 1
                runs = [measure(engine, fasta, args.limit) for _ in range(repeats)]
                finished = [run for run in runs if "timeout" not in run]
                row = {"engine": engine, "size": size, "median_length": lengths[len(lengths) // 2], "runs": len(runs)}
                if len(finished) < len(runs):
                    stopped.add(engine)
                    row["timeout"] = args.limit
                else:
                    row |= {
                        key: statistics.median(run[key] for run in finished)
                        for key in ("seconds", "import_rss_mb", "self_rss_mb", "children_rss_mb", "clusters")
                    }
                    measured[engine].append((size, row["seconds"]))
                    if engine == "mmseqs" and size == args.audit:
                        row["audit"] = audit(sequences, finished[0]["cluster_ids"])
                emit(row)
    for engine, points in measured.items():
        fitted = fit(points)
        if fitted:
            a, b = fitted
            print(
                f"{engine}: time ~ {a:.3g} * N^{b:.2f} over N = {[n for n, _ in points]}; "
                f"projected at {SWISS_PROT:,}: {a * SWISS_PROT**b / 3600:.3g} h",
                flush=True,
            )


if __name__ == "__main__":
    main()
