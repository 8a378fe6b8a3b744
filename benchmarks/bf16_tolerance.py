"""How far bf16 weights move a real chat LLM's answers from fp32: the tolerance behind a bf16 default on CPU.

The LLM (SmolLM2-135M-Instruct as `training/build_smollm2.py` builds it) is loaded twice from the same folder, with
`dtype=torch.float32` and `dtype=torch.bfloat16` (what a saved bf16 checkpoint or `pipeline(..., dtype=...)` gives),
and answers the first `--questions` questions of a SEPIT dataset's test split greedily, each alone (no padding), as
the sequence-as-text baseline reads them: the chat template with `<protein>` replaced by the amino acids as text (cut
at `--max_protein_length`). Reported: the fraction of identical answers, where the first differing token falls, the
last-position logits under teacher forcing on the fp32 answer (max and mean |bf16 - fp32| against the fp32 logits'
spread, top-1 agreement) and the fp32 top-1 margin where greedy decoding diverged (a near-tie or not), and the time
of each. Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/bf16_tolerance.py --llm "$(python training/build_smollm2.py)" \\
        --dataset_dir outputs/main/dataset --questions 32 --new_tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROTEIN_TAG = "<protein>"


def prompts(tokenizer, dataset_dir: str, count: int, max_protein_length: int) -> list[torch.Tensor]:
    """Token ids of the first `count` test questions, the protein written as text where `<protein>` stood."""
    split = load_dataset(f"{dataset_dir}/instructions", split="test")
    if len(split) < count:
        raise ValueError(f"--questions {count}: the test split has {len(split)} rows; ask for at most that many")
    rows = split.select(range(count))
    ids = []
    for question, sequence in zip(rows["question"], rows["sequence"], strict=True):
        text = question.replace(PROTEIN_TAG, f"Protein sequence: {sequence[:max_protein_length]}\n")
        ids.append(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text.strip()}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
        )
    return ids


def answer(model, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> tuple[list[int], float]:
    """Greedy answer token ids (up to the end-of-sequence token) and the seconds taken."""
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return output[0, prompt.shape[1] :].tolist(), time.perf_counter() - start


def teacher_forced_logits(model, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """float32 logits predicting each answer token, given the prompt and the answer so far."""
    ids = torch.cat([prompt, torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[0, prompt.shape[1] - 1 : -1].float()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --llm FOLDER --dataset_dir DATASET [--name value ...]",
    )
    parser.add_argument("--llm", required=True, help="Folder of the chat LLM (training/build_smollm2.py).")
    parser.add_argument("--dataset_dir", required=True, help="SEPIT dataset with an instructions/ test split.")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--max_protein_length", type=int, default=200, help="Residues written as text.")
    args = parser.parse_args()
    for name in ("questions", "new_tokens", "max_protein_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    models = {
        name: AutoModelForCausalLM.from_pretrained(args.llm, dtype=dtype).eval()
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = prompts(tokenizer, args.dataset_dir, args.questions, args.max_protein_length)
    for model in models.values():  # warm-up
        answer(model, inputs[0], 2, pad_id)

    seconds = {name: [] for name in models}
    tokens = {name: 0 for name in models}
    same, divergences, margins, max_diffs, mean_diffs, agreements, total_positions = 0, [], [], [], [], 0, 0
    for index, prompt in enumerate(inputs):
        answers = {}
        for name, model in models.items():
            answers[name], elapsed = answer(model, prompt, args.new_tokens, pad_id)
            seconds[name].append(elapsed)
            tokens[name] += len(answers[name])
        reference = answers["fp32"]
        logits = {name: teacher_forced_logits(model, prompt, reference) for name, model in models.items()}
        spread = logits["fp32"].std(dim=-1)
        difference = (logits["bf16"] - logits["fp32"]).abs()
        max_diffs.append((difference.max(dim=-1).values / spread).max().item())
        mean_diffs.append((difference.mean(dim=-1) / spread).mean().item())
        agreements += int((logits["bf16"].argmax(-1) == logits["fp32"].argmax(-1)).sum())
        total_positions += len(reference)
        where = first_difference(reference, answers["bf16"])
        if where is None:
            same += 1
            status = "identical"
        else:
            divergences.append(where)
            top2 = logits["fp32"][where].topk(2).values if where < len(reference) else None
            margin = (top2[0] - top2[1]).item() / spread[where].item() if top2 is not None else float("nan")
            margins.append(margin)
            status = f"differs from token {where} (fp32 top-1 margin there {margin:.3f} std)"
        print(
            f"# {index:2d}: {len(prompt[0])} prompt tokens, {len(reference)} answer tokens, {status}: "
            f"{tokenizer.decode(reference)[:60]!r} | {tokenizer.decode(answers['bf16'])[:60]!r}",
            flush=True,
        )

    count = len(inputs)
    print(f"# {sys.argv[0]} --llm {args.llm} --questions {count} --new_tokens {args.new_tokens}")
    print(f"identical greedy answers: {same}/{count} ({same / count:.0%})")
    if divergences:
        print(
            f"first differing token of the {len(divergences)} others: median {statistics.median(divergences)}, "
            f"min {min(divergences)}, max {max(divergences)}; fp32 top-1 margin there (in fp32 logit std): median "
            f"{statistics.median(margins):.3f}, max {max(margins):.3f}"
        )
    print(
        f"teacher-forced on the fp32 answers ({total_positions} positions): top-1 agreement "
        f"{agreements / total_positions:.2%}; |bf16 - fp32| / fp32 logit std: mean {statistics.mean(mean_diffs):.4f}, "
        f"max per answer median {statistics.median(max_diffs):.3f}, max {max(max_diffs):.3f}"
    )
    for name in models:
        print(
            f"{name}: {sum(seconds[name]):.1f} s for {tokens[name]} tokens ({tokens[name] / sum(seconds[name]):.1f} "
            f"tokens/s, batch 1)"
        )


if __name__ == "__main__":
    main()
