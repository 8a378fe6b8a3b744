"""How much the language-model loss alone trains the MoE routers of an upcycled model, under three top-1 weightings,
on the same real batches in one run:

- renormalised: the chosen expert's weight p / p = 1, what `norm_topk_prob=True` computed before (no router gradient);
- straight-through (SEPIT's default now): exactly 1 in value, the raw probability's gradient;
- raw: the original's Switch-style weight p (`norm_topk_prob=False`), which changes the upcycled model's function.

Prints the routers' gradient norm (no balancing loss) and whether the upcycled model still equals the dense one.
Usage, from the repository root, after `./run.sh main` (or on any stage-1 folder and dataset)::

    PYTHONPATH=. .venv/bin/python benchmarks/router_gradient.py --stage1 outputs/main/stage1 \
        --dataset_dir outputs/main/dataset
"""

import argparse

import torch
from datasets import load_dataset

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.modeling_moe import SepitTopKRouter

WEIGHTINGS = ("renormalised", "straight-through", "raw")


def renormalised_only(router: SepitTopKRouter, hidden_states: torch.Tensor) -> tuple:
    """The renormalised top-1 weight without the straight-through term (the previous implementation)."""
    logits = torch.nn.functional.linear(hidden_states, router.weight)
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, router.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), index


def measure(folder: str, batches: list[dict], weighting: str) -> tuple[float, float]:
    """(router gradient norm from the LM loss, max |logits - dense logits|) for one weighting."""
    torch.manual_seed(0)
    dense = SepitForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        reference = [dense(**batch).logits for batch in batches]
    model = dense.upcycle_to_moe(num_experts=4, num_experts_per_tok=1, norm_topk_prob=weighting != "raw").eval()
    routers = [module for module in model.modules() if isinstance(module, SepitTopKRouter)]
    for router in routers:
        if weighting == "renormalised":
            router.forward = renormalised_only.__get__(router)
    difference = 0.0
    for batch, expected in zip(batches, reference, strict=True):
        output = model(**batch, output_router_logits=False)
        output.loss.backward()
        difference = max(difference, float((output.logits - expected).abs().max()))
    norm = torch.stack([router.weight.grad.norm() for router in routers]).norm()
    return float(norm), difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", required=True, help="A dense SEPIT folder (stage 1).")
    parser.add_argument("--dataset_dir", required=True, help="A dataset folder built by dataset_card.build_dataset.")
    parser.add_argument("--batches", type=int, default=4, help="Batches of 8 training rows.")
    args = parser.parse_args()

    processor = SepitProcessor.from_pretrained(args.stage1)
    processor.max_protein_length = 128
    collator = processor.get_data_collator(structure_dropout=0.0, seed=0)
    rows = load_dataset(args.dataset_dir, "instructions")["train"].select(range(8 * args.batches))
    batches = [collator([rows[i] for i in range(start, start + 8)]) for start in range(0, len(rows), 8)]
    print("| top-1 weighting | router gradient norm (LM loss only) | max abs logits - dense |")
    print("|---|---:|---:|")
    for weighting in WEIGHTINGS:
        norm, difference = measure(args.stage1, batches, weighting)
        print(f"| {weighting} | {norm:.3g} | {difference:.3g} |")


if __name__ == "__main__":
    main()
