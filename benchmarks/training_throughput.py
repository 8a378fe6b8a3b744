"""Training tokens/s on a Swiss-Prot-like length mix: this implementation against the original SEPIT recipe, on the
same samples, in one run. Project goal: >= 3x.

- ours: each protein keeps its own length, only its real feature positions go to the LLM, text is padded to the
  longest sample of the batch, in random batches and in the Trainer's `group_by_length` batches (what the recipes
  use); `--pooling k` rows add the protein-token reduction (k feature positions per LLM token).
- original recipe: every protein padded to 1024 positions and all of them spliced into the LLM and attended
  (`original_compat`), and the text padded to a fixed maximum length (the longest text of the pool), as the release did.

The length mix is real: sequences of InstructProtein's GO-MF test set (UniProt proteins, median ~300 residues), cut at
1022; the texts are questions and answers of the demo instruction dataset. The models are the tiny CPU parts
(`training/build_tiny_parts.py`); one optimizer step is forward + backward + AdamW. Every system trains one epoch
over the same samples (only their grouping into batches differs); useful tokens (text tokens and residues, no
padding) are the same for all, so the tokens/s ratio is the epoch-time ratio. Systems take turns batch by batch,
after a warm-up epoch. Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/training_throughput.py --dataset_dir outputs/dataset \\
        --parts outputs/tiny-parts [--batch_size 4] [--batches 12] [--repeats 3] [--pooling 4]
"""

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F
from datasets import load_dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from dataset_card.external_benchmarks import GO_MF_FILE
from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.training_sepit import llm_lengths

ORIGINAL_PROTEIN_POSITIONS = 1024


def samples(dataset_dir: str, count: int, seed: int) -> list[dict]:
    """`count` rows: a real protein of the length mix with a question and answer of the demo dataset."""
    sequences = [json.loads(line)["sequence"][:1022] for line in GO_MF_FILE.read_text().splitlines()]
    rng = random.Random(seed)
    chosen = rng.sample(sequences, count)
    texts = load_dataset(dataset_dir, "instructions", split="train").shuffle(seed=seed).select(range(count))
    return [{"messages": row["messages"], "sequence": sequence} for row, sequence in zip(texts, chosen, strict=True)]


def pad_to(batch: dict, width: int, pad_id: int) -> dict:
    """The original recipe's text padding: every sequence right-padded to one fixed width."""
    extra = width - batch["input_ids"].shape[1]
    padded = dict(batch)
    for name, value in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
        padded[name] = F.pad(batch[name], (0, extra), value=value)
    return padded


def step(model: SepitForConditionalGeneration, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def grouped_order(rows: list[dict], processor: SepitProcessor, batch_size: int) -> list[int]:
    """The order in which the Trainer's `group_by_length` sampler (`LengthGroupedSampler`) hands out these rows."""
    columns = {"messages": [row["messages"] for row in rows], "sequence": [row["sequence"] for row in rows]}
    generator = torch.Generator().manual_seed(0)
    return list(LengthGroupedSampler(batch_size, lengths=llm_lengths(columns, processor), generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--parts", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pooling", type=int, nargs="*", default=[4])
    args = parser.parse_args()
    torch.manual_seed(0)
    protein, language = f"{args.parts}/protein_model", f"{args.parts}/language_model"
    rows = samples(args.dataset_dir, args.batch_size * args.batches, seed=0)

    variants = [("ours, random batches", {}, False), ("ours, length-grouped batches", {}, True)]
    variants += [(f"ours, length-grouped, protein_pooling={k}", {"protein_pooling": k}, True) for k in args.pooling]
    variants.append(("original recipe", {"original_compat": True}, False))
    systems = {}
    for name, kwargs, grouped in variants:
        processor_kwargs = dict(kwargs)
        if kwargs.get("original_compat"):
            processor_kwargs["protein_padding_length"] = ORIGINAL_PROTEIN_POSITIONS
        processor = SepitProcessor.from_pretrained_parts(protein, language, **processor_kwargs)
        model = SepitForConditionalGeneration.from_pretrained_parts(
            protein, language, protein_token_id=processor.protein_token_id, **kwargs
        ).train()
        order = grouped_order(rows, processor, args.batch_size) if grouped else list(range(len(rows)))
        collator = SepitDataCollator(processor, structure_dropout=0.0, seed=0)
        batches = [
            collator([rows[i] for i in order[start : start + args.batch_size]])
            for start in range(0, len(order), args.batch_size)
        ]
        if kwargs.get("original_compat"):
            width = max(batch["input_ids"].shape[1] for batch in batches)
            batches = [pad_to(batch, width, processor.tokenizer.pad_token_id) for batch in batches]
        positions = sum(batch["input_ids"].numel() for batch in batches)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        systems[name] = {"model": model, "optimizer": optimizer, "batches": batches, "positions": positions}
        systems[name]["epochs"] = []

    protein_id = systems["ours, random batches"]["model"].config.protein_token_id
    text_tokens = sum(
        int(((batch["input_ids"] != protein_id) & batch["attention_mask"].bool()).sum())
        for batch in systems["ours, random batches"]["batches"]
    )
    useful = sum(len(row["sequence"]) for row in rows) + text_tokens
    for round_index in range(args.repeats + 1):  # round 0 warms up
        seconds = dict.fromkeys(systems, 0.0)
        for index in range(args.batches):  # batch by batch in turn: a burst of other load hits every system alike
            for name, system in systems.items():
                seconds[name] += step(system["model"], system["optimizer"], system["batches"][index])
        if round_index:
            for name, system in systems.items():
                system["epochs"].append(seconds[name])

    print(
        f"{torch.get_num_threads()} threads, {len(rows)} samples in batches of {args.batch_size}, median of "
        f"{args.repeats} epochs; median protein length {statistics.median(len(row['sequence']) for row in rows):.0f}; "
        f"{useful} useful tokens per epoch"
    )
    baseline = statistics.median(systems["original recipe"]["epochs"])
    print("| system | LLM positions per epoch | median s/epoch | useful tokens/s | speed-up vs original |")
    print("|---|---:|---:|---:|---:|")
    for name, system in systems.items():
        median = statistics.median(system["epochs"])
        cells = (name, str(system["positions"]), f"{median:.2f}", f"{useful / median:.0f}", f"{baseline / median:.2f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
