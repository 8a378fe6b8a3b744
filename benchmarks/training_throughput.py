"""Training tokens/s on a Swiss-Prot-like length mix: this implementation against the original SEPIT recipe, on the
same samples, in one run. Project goal: >= 3x.

- ours: each protein keeps its own length, only its real feature positions go to the LLM, text is padded to the
  longest sample of the batch; `--pooling k` rows add the protein-token reduction (k residues per LLM token).
- original recipe: every protein padded to 1024 positions and all of them spliced into the LLM and attended
  (`original_compat`), and the text padded to a fixed maximum length (the longest text of the pool), as the release did.

The length mix is real: sequences of InstructProtein's GO-MF test set (UniProt proteins, median ~300 residues), cut at
1022; the texts are questions and answers of the demo instruction dataset. The models are the tiny CPU parts
(`training/build_tiny_parts.py`); one optimizer step is forward + backward + AdamW. Useful tokens (text tokens and
residues, no padding) are the same for both, so the tokens/s ratio is the step-time ratio. The two are timed batch by
batch in alternation, after a warm-up pass. Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/training_throughput.py --dataset_dir outputs/dataset \\
        --parts outputs/tiny-parts [--batch_size 4] [--batches 6] [--repeats 2] [--pooling 4]
"""

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F
from datasets import load_dataset

from dataset_card.external_benchmarks import GO_MF_FILE
from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--parts", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pooling", type=int, nargs="*", default=[])
    args = parser.parse_args()
    torch.manual_seed(0)
    protein, language = f"{args.parts}/protein_model", f"{args.parts}/language_model"
    rows = samples(args.dataset_dir, args.batch_size * args.batches, seed=0)
    groups = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    systems = {}
    for name, kwargs in (
        ("ours", {}),
        *((f"ours, protein_pooling={k}", {"protein_pooling": k}) for k in args.pooling),
        ("original recipe", {"original_compat": True}),
    ):
        compat = kwargs.get("original_compat", False)
        processor_kwargs = dict(kwargs)
        if compat:
            processor_kwargs["protein_padding_length"] = ORIGINAL_PROTEIN_POSITIONS
        processor = SepitProcessor.from_pretrained_parts(protein, language, **processor_kwargs)
        model = SepitForConditionalGeneration.from_pretrained_parts(
            protein, language, protein_token_id=processor.protein_token_id, **kwargs
        ).train()
        collator = SepitDataCollator(processor, structure_dropout=0.0, seed=0)
        batches = [collator(group) for group in groups]
        if compat:
            width = max(batch["input_ids"].shape[1] for batch in batches)
            batches = [pad_to(batch, width, processor.tokenizer.pad_token_id) for batch in batches]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        positions = sum(batch["input_ids"].numel() for batch in batches) / len(batches)
        systems[name] = {
            "model": model,
            "optimizer": optimizer,
            "batches": batches,
            "positions": positions,
            "times": [],
        }

    ours = systems["ours"]
    protein_id = ours["model"].config.protein_token_id
    text_tokens = sum(
        int(((batch["input_ids"] != protein_id) & batch["attention_mask"].bool()).sum()) for batch in ours["batches"]
    )
    useful = (sum(len(row["sequence"]) for row in rows) + text_tokens) / args.batches
    for round_index in range(args.repeats + 1):
        for index in range(args.batches):
            for system in systems.values():
                seconds = step(system["model"], system["optimizer"], system["batches"][index])
                if round_index:
                    system["times"].append(seconds)

    print(
        f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.batches} batches x {args.repeats} rounds; "
        f"median protein length {statistics.median(len(row['sequence']) for row in rows):.0f}; "
        f"useful tokens per batch {useful:.0f}"
    )
    baseline = statistics.median(systems["original recipe"]["times"])
    print("| system | LLM positions per batch | median s/step | useful tokens/s | speed-up vs original |")
    print("|---|---:|---:|---:|---:|")
    for name, system in systems.items():
        median = statistics.median(system["times"])
        print(
            f"| {name} | {system['positions']:.0f} | {median:.3f} | {useful / median:.0f} | {baseline / median:.2f} |"
        )


if __name__ == "__main__":
    main()
