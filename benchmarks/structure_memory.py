"""Peak memory and wall time of SEPIT's structure module against a direct implementation of the original math.

The original SEPIT ``StructureBias`` expands every residue pair into K Gaussian kernel values and keeps the whole
(B, L, L, K) tensor (plus its MLP activations) alive, so its memory grows as L^2 * K. ``SepitStructureModule`` processes
residue pairs in row chunks and, under autograd, recomputes each chunk in the backward pass (activation checkpointing),
so only the (B, heads, L, L) bias and the chunk currently being worked on have to be held. This script measures what
that buys, at the sizes that matter for ESM-2 650M (20 heads, hidden 1280), with K = 128 kernels and one protein of
length 256, 512 and 1024, both for forward only (``torch.no_grad()``) and for forward + backward (parameters require
grad, loss = bias.sum() + embedding_term.sum()).

Memory is measured on CPU as growth of the peak resident set size (``ru_maxrss``) over the call, each (implementation,
length, mode) in a fresh interpreter so that one measurement cannot inherit another's high-water mark; each is taken
twice, with glibc's default malloc settings and with a fixed mmap threshold (see `FIXED_MMAP_ENV`), because the
default settings keep freed chunk-sized blocks in the heap and so inflate the RSS of the chunked implementation. Time
is the median of 3 calls in the default-malloc interpreter (the peak comes from the first); it is sensitive to other
load on the machine, so the 1-minute load average before and after the run is recorded too.

Before measuring, the script checks, in a fresh interpreter per length, that both implementations give the same bias
and embedding term (and, at the shortest length, the same parameter gradients) with the same parameter values.

Usage (from the repository root)::

    .venv/bin/python benchmarks/structure_memory.py            # run everything, print the table, update README.md
    .venv/bin/python benchmarks/structure_memory.py --worker IMPL LENGTH MODE   # one measurement (internal)
    .venv/bin/python benchmarks/structure_memory.py --time LENGTH MODE          # interleaved timing (internal)
    .venv/bin/python benchmarks/structure_memory.py --check LENGTH              # one equality check (internal)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modeling_sepit import SepitConfig  # noqa: E402
from modeling_sepit.modeling_structure import SepitStructureModule  # noqa: E402

LENGTHS = (256, 512, 1024)
MODES = ("forward", "forward+backward")
IMPLS = ("ours", "direct")
NUM_KERNELS = 128
NUM_HEADS = 20
HIDDEN_SIZE = 1280
REPEATS = 3
NUM_THREADS = 2
WARMUP_LENGTH = 8
SEED = 0
BIAS_TOLERANCE = 1e-4
README_HEADING = "## Structure module: peak memory and time"
# glibc raises its mmap threshold (up to 32 MiB) each time an mmapped block is freed, after which freed chunk-sized
# blocks stay in the heap and count in RSS. Fixing the threshold (which disables that adjustment) makes every tensor
# above 64 KiB its own mapping, returned on free, so the RSS peak is close to the peak of live tensor memory.
FIXED_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def make_config() -> SepitConfig:
    """ESM-2 650M-sized protein attention (20 heads, hidden 1280) with a tiny text model; only the structure matters."""
    from transformers import EsmConfig

    protein_config = EsmConfig(
        vocab_size=33,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=NUM_HEADS,
        intermediate_size=64,
        position_embedding_type="rotary",
        pad_token_id=1,
        mask_token_id=32,
    )
    text_config = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    return SepitConfig(protein_config=protein_config, text_config=text_config, num_gaussian_kernels=NUM_KERNELS)


def make_ours(config: SepitConfig) -> SepitStructureModule:
    torch.manual_seed(SEED)
    module = SepitStructureModule(config)
    nn.init.uniform_(module.gaussian_kernels.means, 0.0, 3.0)
    nn.init.uniform_(module.gaussian_kernels.stds, 0.0, 3.0)
    return module


class DirectStructureBias(nn.Module):
    """The original SEPIT StructureBias math, materialising the (B, L, L, K) kernel tensor."""

    def __init__(self, num_kernels: int, num_heads: int, hidden_size: int, embedding_scale: float):
        super().__init__()
        self.num_kernels = num_kernels
        self.embedding_scale = embedding_scale
        self.means = nn.Parameter(torch.empty(num_kernels))
        self.stds = nn.Parameter(torch.empty(num_kernels))
        self.layer1 = nn.Linear(num_kernels, num_kernels)
        self.layer2 = nn.Linear(num_kernels, num_heads)
        self.edge_proj = nn.Linear(num_kernels, hidden_size)

    @classmethod
    def from_ours(cls, ours: SepitStructureModule) -> DirectStructureBias:
        """Copy `ours` parameters: kernel_proj_in/out -> layer1/2, embedding_proj -> edge_proj, means/stds as is."""
        direct = cls(
            ours.kernel_proj_in.in_features,
            ours.kernel_proj_out.out_features,
            ours.embedding_proj.out_features,
            ours.embedding_scale,
        )
        with torch.no_grad():
            direct.means.copy_(ours.gaussian_kernels.means)
            direct.stds.copy_(ours.gaussian_kernels.stds)
            for target, source in (
                (direct.layer1, ours.kernel_proj_in),
                (direct.layer2, ours.kernel_proj_out),
                (direct.edge_proj, ours.embedding_proj),
            ):
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        return direct

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = (pos.unsqueeze(1) - pos.unsqueeze(2)).norm(dim=-1)
        x = dist.unsqueeze(-1).expand(-1, -1, -1, self.num_kernels)
        std = self.stds.abs() + 1e-3
        g = torch.exp(-0.5 * ((x - self.means) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
        bias = self.layer2(F.gelu(self.layer1(g))).permute(0, 3, 1, 2)
        emb = self.edge_proj(g.sum(dim=-2)) * self.embedding_scale
        return bias, emb


def make_inputs(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A C-alpha-like random walk (3.8 A steps); every residue has coordinates."""
    generator = torch.Generator().manual_seed(SEED + length)
    steps = torch.randn(length, 3, generator=generator)
    steps = 3.8 * steps / steps.norm(dim=-1, keepdim=True)
    coords = steps.cumsum(dim=0).unsqueeze(0)
    return coords, torch.ones(1, length, dtype=torch.bool)


def run_module(impl: str, module: nn.Module, coords: torch.Tensor, mask: torch.Tensor, backward: bool) -> None:
    if backward:
        for parameter in module.parameters():
            parameter.grad = None
        bias, emb = module(coords, mask) if impl == "ours" else module(coords)
        (bias.sum() + emb.sum()).backward()
    else:
        with torch.no_grad():
            module(coords, mask) if impl == "ours" else module(coords)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(impl: str, length: int, mode: str) -> dict[str, object]:
    """One measurement, meant to run in a fresh interpreter."""
    torch.set_num_threads(NUM_THREADS)
    ours = make_ours(make_config())
    module: nn.Module = ours if impl == "ours" else DirectStructureBias.from_ours(ours)
    if impl != "ours":
        del ours
    backward = mode == "forward+backward"
    module.requires_grad_(backward)
    warmup_coords, warmup_mask = make_inputs(WARMUP_LENGTH)
    run_module(impl, module, warmup_coords, warmup_mask, backward)
    coords, mask = make_inputs(length)

    result: dict[str, object] = {"impl": impl, "length": length, "mode": mode}
    times = []
    try:
        for repeat in range(REPEATS):
            before = max_rss_mib()
            start = time.perf_counter()
            run_module(impl, module, coords, mask, backward)
            times.append(time.perf_counter() - start)
            if repeat == 0:
                result["peak_mib"] = max_rss_mib() - before
    except (MemoryError, RuntimeError) as error:
        result["error"] = f"OOM ({type(error).__name__}: {str(error)[:200]})"
        return result
    result["seconds"] = statistics.median(times)
    result["all_seconds"] = times
    return result


def time_interleaved(length: int, mode: str) -> dict[str, object]:
    """Both implementations timed in one interpreter, alternating call by call, so that a change in the machine's other
    load during the run hits both alike (meant to run in a fresh interpreter; memory is not measured here)."""
    torch.set_num_threads(NUM_THREADS)
    ours = make_ours(make_config())
    modules: dict[str, nn.Module] = {"ours": ours, "direct": DirectStructureBias.from_ours(ours)}
    backward = mode == "forward+backward"
    warmup_coords, warmup_mask = make_inputs(WARMUP_LENGTH)
    for impl, module in modules.items():
        module.requires_grad_(backward)
        run_module(impl, module, warmup_coords, warmup_mask, backward)
    coords, mask = make_inputs(length)
    times: dict[str, list[float]] = {impl: [] for impl in modules}
    try:
        for _ in range(REPEATS):
            for impl, module in modules.items():
                start = time.perf_counter()
                run_module(impl, module, coords, mask, backward)
                times[impl].append(time.perf_counter() - start)
    except (MemoryError, RuntimeError) as error:
        return {"error": f"OOM ({type(error).__name__}: {str(error)[:200]})"}
    return {impl: {"seconds": statistics.median(ts), "all_seconds": ts} for impl, ts in times.items()}


def check(length: int) -> dict[str, object]:
    """Bias / embedding equality (and, at the shortest length, gradient equality) of both implementations."""
    torch.set_num_threads(NUM_THREADS)
    ours = make_ours(make_config())
    direct = DirectStructureBias.from_ours(ours)
    coords, mask = make_inputs(length)
    with torch.no_grad():
        ours_bias, ours_emb = ours(coords, mask)
        direct_bias, direct_emb = direct(coords)
    pair_mask = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(1).expand_as(ours_bias)
    result: dict[str, object] = {
        "length": length,
        "bias_shape": list(ours_bias.shape),
        "bias_max_abs_diff": (ours_bias - direct_bias)[pair_mask].abs().max().item(),
        "bias_max_abs": direct_bias.abs().max().item(),
        "emb_max_abs_diff": (ours_emb - direct_emb).abs().max().item(),
        "emb_max_abs": direct_emb.abs().max().item(),
    }
    del ours_bias, ours_emb, direct_bias, direct_emb
    if length == min(LENGTHS):
        pairs = (
            ("gaussian_kernels.means", "means"),
            ("gaussian_kernels.stds", "stds"),
            ("kernel_proj_in.weight", "layer1.weight"),
            ("kernel_proj_in.bias", "layer1.bias"),
            ("kernel_proj_out.weight", "layer2.weight"),
            ("kernel_proj_out.bias", "layer2.bias"),
            ("embedding_proj.weight", "edge_proj.weight"),
            ("embedding_proj.bias", "edge_proj.bias"),
        )
        run_module("ours", ours, coords, mask, backward=True)
        run_module("direct", direct, coords, mask, backward=True)
        ours_params = dict(ours.named_parameters())
        direct_params = dict(direct.named_parameters())
        grad_rel_diff = {}
        for ours_name, direct_name in pairs:
            a, b = ours_params[ours_name].grad, direct_params[direct_name].grad
            grad_rel_diff[ours_name] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        result["grad_max_rel_diff"] = grad_rel_diff
    return result


def run_subprocess(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    completed = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, **(env or {})}
    )
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or [""]
        killed = completed.returncode in (-9, 137)  # SIGKILL, e.g. from the kernel's OOM killer
        return {"error": f"{'OOM' if killed else 'FAILED'} (exit {completed.returncode}: {tail[0][:200]})"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _peak(row: dict[str, object], key: str) -> str:
    measured = row[key]
    return str(measured["error"]).split()[0] if "error" in measured else f"{measured['peak_mib']:.1f}"


def _seconds(measured: dict[str, object]) -> str:
    return str(measured["error"]).split()[0] if "error" in measured else f"{measured['seconds']:.3f}"


def format_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| L | mode | impl | peak MiB (default malloc) | peak MiB (fixed mmap threshold) | median s (own process) "
        "| median s (interleaved) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['length']} | {row['mode']} | {row['impl']} | {_peak(row, 'default')} | "
            f"{_peak(row, 'fixed_mmap')} | {_seconds(row['default'])} | {_seconds(row['interleaved'])} |"
        )
    return "\n".join(lines)


def _ratio(ours: dict[str, object], direct: dict[str, object], key: str) -> str:
    if "error" in ours or "error" in direct or not direct[key] > 0:
        return "n/a"
    ratio = ours[key] / direct[key]
    return f"{ratio:.3f} (1/{1 / ratio:.1f})" if key == "peak_mib" else f"{ratio:.3f}"


def format_ratios(results: list[dict[str, object]]) -> str:
    index = {(r["length"], r["mode"], r["impl"]): r for r in results}
    lines = [
        "| L | mode | memory (default malloc) | memory (fixed mmap threshold) | time (own process) "
        "| time (interleaved) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for length in LENGTHS:
        for mode in MODES:
            ours, direct = index[(length, mode, "ours")], index[(length, mode, "direct")]
            default = _ratio(ours["default"], direct["default"], "peak_mib")
            fixed = _ratio(ours["fixed_mmap"], direct["fixed_mmap"], "peak_mib")
            seconds = _ratio(ours["default"], direct["default"], "seconds")
            interleaved = _ratio(ours["interleaved"], direct["interleaved"], "seconds")
            lines.append(f"| {length} | {mode} | {default} | {fixed} | {seconds} | {interleaved} |")
    return "\n".join(lines)


def update_readme(section: str) -> None:
    readme = Path(__file__).resolve().parent / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(README_HEADING)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda match: section + ("\n" if match.end() == len(text) else "\n\n"), text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)


def main() -> None:
    # No options: the parser gives `--help` its text and refuses anything else before the long run starts.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    load_before = os.getloadavg()[0]
    checks = []
    for length in LENGTHS:
        result = run_subprocess(["--check", str(length)])
        print(json.dumps(result), flush=True)
        if "error" in result:
            raise SystemExit(f"equality check failed to run at L={length}: {result['error']}")
        checks.append(result)
        assert result["bias_max_abs_diff"] < BIAS_TOLERANCE, f"bias differs at L={length}: {result}"

    results = []
    for length in LENGTHS:
        for mode in MODES:
            interleaved = run_subprocess(["--time", str(length), mode])
            print(json.dumps({"length": length, "mode": mode, "interleaved": interleaved}), flush=True)
            for impl in IMPLS:
                args = ["--worker", impl, str(length), mode]
                result = {
                    "impl": impl,
                    "length": length,
                    "mode": mode,
                    "default": run_subprocess(args),
                    "fixed_mmap": run_subprocess(args, FIXED_MMAP_ENV),
                    "interleaved": interleaved if "error" in interleaved else interleaved[impl],
                }
                print(json.dumps(result), flush=True)
                results.append(result)

    load_after = os.getloadavg()[0]
    command = ".venv/bin/python benchmarks/structure_memory.py  (from the repository root)"
    machine = (
        f"{platform.machine()} CPU, `nproc` = {os.cpu_count()}, torch.set_num_threads({NUM_THREADS}), "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}; "
        f"1-minute load average {load_before:.2f} before and {load_after:.2f} after the run"
    )
    max_bias_diff = max(c["bias_max_abs_diff"] for c in checks)
    max_emb_diff = max(c["emb_max_abs_diff"] for c in checks)
    section = "\n".join(
        [
            README_HEADING,
            "",
            f"One protein (batch 1), K = {NUM_KERNELS} Gaussian kernels, {NUM_HEADS} heads, hidden {HIDDEN_SIZE} "
            "(ESM-2 650M). `ours` is `SepitStructureModule` (row-chunked pairs, activation checkpointing under "
            "autograd); `direct` is the original SEPIT StructureBias math materialising (B, L, L, K), with the same "
            "parameter values. `forward` runs under `torch.no_grad()`; `forward+backward` has parameters requiring "
            "grad and loss = bias.sum() + embedding_term.sum(). Peak MiB is the growth of `ru_maxrss` over the first "
            f"call, each row in a fresh interpreter after a warm-up at L = {WARMUP_LENGTH}, measured twice: with "
            "glibc's default malloc settings, and with `MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536` "
            "(fixed mmap threshold: freed tensors go back to the OS, so the RSS peak tracks live tensor memory rather "
            f"than what the allocator keeps). Time is the median of {REPEATS} calls, in the default-malloc process of "
            "that row (own process) and in one process per (L, mode) that alternates the two implementations call by "
            "call (interleaved, less exposed to changes in the machine's other load).",
            "",
            format_table(results),
            "",
            "Ratios (ours / direct):",
            "",
            format_ratios(results),
            "",
            f"Equality check (all residues with coordinates): max |bias diff| = {max_bias_diff:.2e}, "
            f"max |embedding diff| = {max_emb_diff:.2e} over L in {list(LENGTHS)}.",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine}.",
        ]
    )
    print()
    print(section)
    update_readme(section)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--time":
        print(json.dumps(time_interleaved(int(sys.argv[2]), sys.argv[3])))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--check":
        print(json.dumps(check(int(sys.argv[2]))))
    else:
        main()
