"""Training tokens/s at the paper's geometry against the original recipe, on a Swiss-Prot length mix: the
`throughput` row of the "Paper geometry" section (benchmarks/README.md), beside `paper_geometry.py`'s rows, whose
timing, peak-memory, matmul-peak and FLOP-counting helpers it uses.

- ours: each protein keeps its own length and only its real positions go to the LLM, in random batches and in the
  Trainer's `group_by_length` batches (what the recipes use);
- original recipe: every protein padded to 1024 positions, all of them spliced into the LLM and attended
  (`original_compat`), the text padded to the pool's longest, in random batches.

The length mix: annotated UniProt entries (with a function text, as Swiss-Prot's are; the bundled demo corpus unless
`--uniprot` names others) whose lengths sit at the (i + 1/2) / n quantiles of the 3,415 UniProt proteins of the GO-MF
test set (median 309 residues), cut at 1022, each with a random-walk structure and its own question and answer as the
demo dataset writes them: the caption request for stage 1, an open-ended question for stage 2. Stage 2 is the model
upcycled to 4 experts, top-1, capacity factor 1.25, encoder and structure module frozen, as the recipes train it.

The systems share one model (switched to `original_compat` for the original: two copies of the paper geometry would
not fit in memory) and take turns batch by batch, after a warm-up step. Every step appends a record (seconds, peak
RSS, positions, useful tokens, and FLOPs counted in an untimed step of their own) to `--record`, so one epoch can be
spread over several processes (`--batch_indices`, each a short run), and the table covers every record in the file.
`--step backward` times forward + backward with each gradient freed as soon as it is accumulated (as an optimizer
fused into the backward would): ESM-2 650M + TinyLlama's 1.75B fp32 weights fit in memory, their gradients and
AdamW state do not.
Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/paper_throughput.py --parts outputs/paper-parts --stage 1 \\
        --batch_size 2 --step backward --activation_checkpointing --batch_indices 0 --record stage1.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.paper_geometry import (  # noqa: E402
    FIXED_THRESHOLD,
    LIBC,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    counted_flops,
    load_sepit,
    matmul_peak,
    measured,
    random_walk,
    sequences,
)
from benchmarks.training_throughput import ORIGINAL_PROTEIN_POSITIONS, grouped_order, pad_to  # noqa: E402
from dataset_card.build_dataset import DEMO_UNIPROT  # noqa: E402
from dataset_card.instructions import caption_instruction, open_ended_questions  # noqa: E402
from dataset_card.uniprot_reader import UniProtEntry, iter_entries  # noqa: E402
from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor  # noqa: E402
from modeling_sepit.training_sepit import freeze_modules  # noqa: E402

MAX_RESIDUES = 1022
ORIGINAL = "original recipe"


def annotated_entries(paths: Iterable[str]) -> list[UniProtEntry]:
    """Entries with a function text (Swiss-Prot's curated kind; unreviewed entries seldom have one), one per
    accession, in a fixed order."""
    entries: dict[str, UniProtEntry] = {}
    for path in paths:
        for entry in iter_entries(path):
            if entry.function and entry.accession not in entries:
                entries[entry.accession] = entry
    return sorted(entries.values(), key=lambda entry: (len(entry.sequence), entry.accession))


def length_mix(entries: list[UniProtEntry], reference: list[int], count: int) -> list[UniProtEntry]:
    """`count` entries whose lengths follow `reference`: for each (i + 1/2) / count quantile of it, the unused entry of
    nearest length. A handful of proteins drawn at random would scatter far from the distribution; these follow it."""
    if not 0 < count <= len(entries):
        raise ValueError(f"proteins: {count} asked of {len(entries)} annotated entries; give 1 to {len(entries)}")
    ordered = sorted(reference)
    chosen: list[UniProtEntry] = []
    for index in range(count):
        target = ordered[int((index + 0.5) / count * len(ordered))]
        unused = (entry for entry in entries if entry not in chosen)
        chosen.append(min(unused, key=lambda entry: abs(len(entry.sequence) - target)))
    return chosen


def training_rows(entries: list[UniProtEntry], stage: int, seed: int = 0) -> list[dict]:
    """One training row per entry, as the demo dataset writes them: the caption request (stage 1) or one of the
    entry's open-ended questions (stage 2), the sequence cut at 1022 residues, a random-walk structure."""
    rng = random.Random(seed)
    rows = []
    for index, entry in enumerate(entries):
        instruction = caption_instruction(entry, rng) if stage == 1 else rng.choice(open_ended_questions(entry, rng))
        length = min(len(entry.sequence), MAX_RESIDUES)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": instruction.question},
                    {"role": "assistant", "content": instruction.answer},
                ],
                "sequence": entry.sequence[:length],
                "coords": random_walk(length, seed=index),
                "coords_mask": [1] * length,
            }
        )
    return rows


def use_original_recipe(model: SepitForConditionalGeneration, original: bool) -> None:
    """Switch the model between SEPIT's splicing and the original release's (`original_compat`), which the model reads
    from its config at every call and the structure module keeps from its construction."""
    model.config.original_compat = original
    if model.model.structure_module is not None:
        model.model.structure_module.original_compat = original


def recipe_batches(
    rows: list[dict], processor: SepitProcessor, original_processor: SepitProcessor, batch_size: int, seed: int = 0
) -> dict[str, list[tuple[list[int], dict]]]:
    """Each system's batches of one epoch over the same rows, as (row indices, batch): ours in random and (batch size
    > 1) length-grouped order, the original in the same random order, proteins padded to 1024 positions and text to
    the pool's longest."""
    shuffled = list(range(len(rows)))
    random.Random(seed).shuffle(shuffled)
    orders = {"ours, random batches": shuffled}
    if batch_size > 1:
        orders["ours, length-grouped batches"] = grouped_order(rows, processor, batch_size)
    orders[ORIGINAL] = shuffled
    systems = {}
    for name, order in orders.items():
        collator = SepitDataCollator(original_processor if name == ORIGINAL else processor, structure_dropout=0.0)
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        systems[name] = [(chunk, dict(collator([rows[i] for i in chunk]))) for chunk in chunks]
    width = max(batch["input_ids"].shape[1] for _, batch in systems[ORIGINAL])
    pad_id = original_processor.tokenizer.pad_token_id
    systems[ORIGINAL] = [(chunk, pad_to(batch, width, pad_id)) for chunk, batch in systems[ORIGINAL]]
    return systems


def useful_tokens(batch: dict, chosen: list[str], protein_token_id: int) -> int:
    """Residues and text tokens of a batch: what any recipe must process, padding and placeholders excluded."""
    text = int(((batch["input_ids"] != protein_token_id) & batch["attention_mask"].bool()).sum())
    return text + sum(len(sequence) for sequence in chosen)


def train_step(model: SepitForConditionalGeneration, optimizer: torch.optim.Optimizer | None, batch: dict) -> None:
    """Forward, backward and (with an optimizer) its step; the router's auxiliary loss included in stage 2."""
    output = model(**batch)
    loss = output.loss + (output.aux_loss if getattr(output, "aux_loss", None) is not None else 0)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def drop_gradients(model: SepitForConditionalGeneration) -> None:
    """Free each gradient once the backward has accumulated it: every gradient is still computed, but the weights
    never hold a full set of gradients beside them."""

    def drop(parameter: torch.Tensor) -> None:
        parameter.grad = None

    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(drop)


def stage_model(args: argparse.Namespace) -> tuple[SepitProcessor, SepitProcessor, SepitForConditionalGeneration]:
    processor, model = load_sepit(args.parts, MAX_RESIDUES)
    original_processor = SepitProcessor.from_pretrained_parts(
        f"{args.parts}/protein_model",
        f"{args.parts}/language_model",
        max_protein_length=MAX_RESIDUES,
        protein_padding_length=ORIGINAL_PROTEIN_POSITIONS,
        original_compat=True,
    )
    if args.stage == 2:
        model = model.upcycle_to_moe(num_experts=4, num_experts_per_tok=1, expert_capacity_factor=1.25)
        model.config.text_config.output_router_logits = True
        freeze_modules(model, ["protein_model", "structure_module"])
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return processor, original_processor, model.train()


def run(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    peak = matmul_peak(torch.float32)
    rows = training_rows(
        length_mix(annotated_entries(args.uniprot), [len(s) for s in sequences()], args.proteins), args.stage
    )
    processor, original_processor, model = stage_model(args)
    systems = recipe_batches(rows, processor, original_processor, args.batch_size)
    if args.no_grouped:
        systems.pop("ours, length-grouped batches", None)
    batches = len(systems[ORIGINAL])
    if not all(0 <= index < batches for index in args.batch_indices):
        raise ValueError(f"batch_indices: {args.batch_indices} outside the epoch's batches 0 to {batches - 1}")
    optimizer = None
    if args.step == "adamw":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    else:
        drop_gradients(model)
    config = model.config
    setup = {
        "stage": args.stage,
        "geometry": f"ESM {config.protein_config.num_hidden_layers}x{config.protein_config.hidden_size}, LLM "
        f"{config.text_config.num_hidden_layers}x{config.text_config.hidden_size}",
        "proteins": args.proteins,
        "lengths": [len(row["sequence"]) for row in rows],
        "batch_size": args.batch_size,
        "step": args.step,
        "activation_checkpointing": args.activation_checkpointing,
        "threads": torch.get_num_threads(),
    }
    train_step(model, optimizer, {name: value[:1] for name, value in systems["ours, random batches"][0][1].items()})
    with open(args.record, "a") as record:
        for round_index in range(args.rounds):
            for index in args.batch_indices:
                for name, system_batches in systems.items():
                    use_original_recipe(model, name == ORIGINAL)
                    chunk, batch = system_batches[index]
                    seconds, _, peak_mib, _ = measured(lambda batch=batch: train_step(model, optimizer, batch))
                    # Counted in an untimed step of its own, once per batch: under FlopCounterMode a checkpointed
                    # step kept its activations (+2.6 GB) and took 29% longer (ESM-2 650M + SmolLM2-135M, 460 residues).
                    flops = None
                    if round_index == 0 and not args.skip_flops:
                        flops = counted_flops(lambda batch=batch: train_step(model, optimizer, batch))
                    step = {
                        "system": name,
                        "round": round_index,
                        "batch": index,
                        "batches": batches,
                        "seconds": seconds,
                        "flops": flops,
                        "peak_mib": peak_mib,
                        "llm_positions": batch["input_ids"].numel(),
                        "protein_positions": batch["protein_input_ids"].numel(),
                        "useful_tokens": useful_tokens(
                            batch, [rows[i]["sequence"] for i in chunk], processor.protein_token_id
                        ),
                        "fp32_peak_gflops": peak,
                        "load": [load_before[0], os.getloadavg()[0]],
                    }
                    record.write(json.dumps({"setup": setup, **step}) + "\n")
                    record.flush()
                    print(f"# {name}, batch {index}: {seconds:.1f} s, {(flops or 0) / 1e12:.2f} TFLOP", flush=True)
    print(f"# load average before {load_before}, after {os.getloadavg()}")


def table(path: str) -> None:
    """The table of every record in `path`: per system, the epoch as the sum over batches of each batch's median
    seconds over rounds, useful tokens/s, speed-up against the original recipe, and achieved FLOP/s."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    setups = {json.dumps(record["setup"], sort_keys=True) for record in records}
    if len(setups) != 1:
        raise ValueError(f"record: {path} mixes {len(setups)} set-ups; give one file per stage and set-up")
    setup = records[0]["setup"]
    steps: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        steps[record["system"]][record["batch"]].append(record)
    batches = records[0]["batches"]
    peak = statistics.median(record["fp32_peak_gflops"] for record in records)
    loads = [load for record in records for load in record["load"]]
    print(
        f"stage {setup['stage']}, {setup['geometry']}, fp32, {setup['threads']} threads; {setup['proteins']} proteins "
        f"of {setup['lengths']} residues (median {statistics.median(setup['lengths']):.0f}) in batches of "
        f"{setup['batch_size']}; step: {setup['step']}, activation checkpointing {setup['activation_checkpointing']};"
        f" matmul peak fp32 {peak:.0f} GFLOP/s; load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print(
        "| system | batches measured | rounds | LLM positions | ESM positions | s/epoch | useful tokens/s | "
        "speed-up vs original | TFLOP/epoch | GFLOP/s | of fp32 peak | peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    epochs = {}
    for name, per_batch in steps.items():
        median = {index: statistics.median(r["seconds"] for r in values) for index, values in per_batch.items()}
        epochs[name] = sum(median.values())
    for name, per_batch in steps.items():
        first = [values[0] for values in per_batch.values()]
        useful = sum(r["useful_tokens"] for r in first)
        counted = [[r["flops"] for r in values if r["flops"] is not None] for values in per_batch.values()]
        flops = sum(statistics.median(values) for values in counted) if all(counted) else None
        same_batches = set(per_batch) == set(steps.get(ORIGINAL, {}))
        speedup = f"{epochs[ORIGINAL] / epochs[name]:.2f}" if same_batches else "n/a"
        rate = flops / epochs[name] / 1e9 if flops else None
        cells = (
            name,
            f"{len(per_batch)} of {batches}",
            str(min(len(values) for values in per_batch.values())),
            str(sum(r["llm_positions"] for r in first)),
            str(sum(r["protein_positions"] for r in first)),
            f"{epochs[name]:.1f}",
            f"{useful / epochs[name]:.1f}",
            speedup,
            f"{flops / 1e12:.2f}" if flops else "n/a",
            f"{rate:.0f}" if rate else "n/a",
            f"{rate / peak:.2f}" if rate else "n/a",
            f"{max(r['peak_mib'] for values in per_batch.values() for r in values):.0f}",
        )
        print("| " + " | ".join(cells) + " |")
    original = steps.get(ORIGINAL, {})
    ours = steps.get("ours, random batches", {})
    paired = [
        statistics.median(r["seconds"] for r in original[index]) / statistics.median(r["seconds"] for r in ours[index])
        for index in sorted(set(original) & set(ours))
    ]
    if paired:
        print(
            f"original / ours (random batches) on the same proteins, per batch: "
            f"{', '.join(f'{ratio:.2f}' for ratio in paired)}; median {statistics.median(paired):.2f}"
        )
    for name, per_batch in steps.items():
        if name != ORIGINAL and set(per_batch) == set(original):
            positions = sum(values[0]["llm_positions"] for values in original.values()) / sum(
                values[0]["llm_positions"] for values in per_batch.values()
            )
            print(f"prediction from LLM positions, original / {name}: {positions:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --parts PARTS --stage {1,2} --record FILE [--name value ...]",
    )
    parser.add_argument("--parts", required=True, help="Folder with protein_model/ and language_model/.")
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--record", required=True, help="JSON-lines file the steps are appended to.")
    parser.add_argument("--uniprot", nargs="+", default=list(DEMO_UNIPROT), help="UniProt files or folders.")
    parser.add_argument("--proteins", type=int, default=6, help="Proteins in the length mix (one epoch).")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--batch_indices", type=int, nargs="+", help="Batches of the epoch to run (default: all).")
    parser.add_argument("--rounds", type=int, default=1, help="Times each batch is run by each system.")
    parser.add_argument("--step", choices=["adamw", "backward"], default="adamw")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument(
        "--skip_flops",
        action="store_true",
        help="Do not count FLOPs (one more untimed step per batch, with more memory).",
    )
    parser.add_argument(
        "--no_grouped", action="store_true", help="Leave out ours in length-grouped batches (a shorter run)."
    )
    parser.add_argument("--table_only", action="store_true", help="Print the table of --record and run nothing.")
    args = parser.parse_args(argv)
    try:
        if not args.table_only:
            for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
                if LIBC.mallopt(option, FIXED_THRESHOLD) != 1:
                    raise RuntimeError(f"mallopt({option}, {FIXED_THRESHOLD}) failed: peak RSS not comparable")
            torch.manual_seed(0)
            if args.batch_indices is None:
                args.batch_indices = list(range(-(-args.proteins // args.batch_size)))
            start = time.perf_counter()
            run(args)
            print(f"# {time.perf_counter() - start:.0f} s in all")
        table(args.record)
    except ValueError as error:
        print(f"paper_throughput: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
