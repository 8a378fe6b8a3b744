"""Training step time of stage 2 (the stage-1 model upcycled to top-1 MoE, 4 experts, encoder frozen) against stage 1
(the same dense model, everything trained), on the same real batches, in one run. Project goal: stage 2 / stage 1
<= 1.25. Also reports tokens/s (LLM tokens, padding excluded). Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/stage_step_time.py --dataset_dir outputs/dataset --parts outputs/tiny-parts

`--dataset_dir` / `--parts` come from `python -m dataset_card.build_dataset` and `training/build_tiny_parts.py`.
"""

import argparse
import statistics
import time

import torch
from datasets import load_dataset

from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.training_sepit import freeze_modules


def step_times(model, batches: list[dict], repeats: int) -> list[float]:
    """Seconds per optimizer step (forward, backward, AdamW), one warm-up pass over the batches first."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for round_index in range(repeats + 1):
        for batch in batches:
            start = time.perf_counter()
            output = model(**batch)
            loss = output.loss + (output.aux_loss if getattr(output, "aux_loss", None) is not None else 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index:
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--parts", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_protein_length", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    protein, language = f"{args.parts}/protein_model", f"{args.parts}/language_model"
    processor = SepitProcessor.from_pretrained_parts(protein, language, max_protein_length=args.max_protein_length)
    rows = load_dataset(args.dataset_dir, "instructions", split="train").shuffle(seed=0)
    collator = SepitDataCollator(processor, structure_dropout=0.0, seed=0)
    batches = [
        collator(rows.select(range(i * args.batch_size, (i + 1) * args.batch_size)).to_list())
        for i in range(args.batches)
    ]
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches) / len(batches)
    dense = SepitForConditionalGeneration.from_pretrained_parts(
        protein, language, protein_token_id=processor.protein_token_id
    )
    dense_times = step_times(dense, batches, args.repeats)
    moe = dense.upcycle_to_moe(num_experts=4, num_experts_per_tok=1)
    moe.config.text_config.output_router_logits = True
    freeze_modules(moe, ["protein_model", "structure_module"])
    moe_times = step_times(moe, batches, args.repeats)
    frozen = SepitForConditionalGeneration.from_pretrained_parts(
        protein, language, protein_token_id=processor.protein_token_id
    )
    freeze_modules(frozen, ["protein_model", "structure_module"])
    frozen_times = step_times(frozen, batches, args.repeats)
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {tokens:.0f} LLM tokens per batch (mean)")
    rows_out = (
        ("stage 1: dense, all trained", dense_times),
        ("dense, encoder frozen", frozen_times),
        ("stage 2: top-1 of 4 experts, encoder frozen", moe_times),
    )
    for name, times in rows_out:
        median = statistics.median(times)
        print(f"{name:45s} median {median * 1000:7.1f} ms/step over {len(times)}  {tokens / median:8.0f} tokens/s")
    ratio = statistics.median(moe_times) / statistics.median(dense_times)
    same_freezing = statistics.median(moe_times) / statistics.median(frozen_times)
    print(f"stage 2 / stage 1 = {ratio:.2f} (goal <= 1.25); MoE / dense with the same freezing = {same_freezing:.2f}")


if __name__ == "__main__":
    main()
