"""Generation tokens/s of SEPIT against the bare LLM generating from prompts of the same length, batch 1 and 8, in one
run. Project goal: SEPIT >= 0.9x the bare LLM.

SEPIT gets real proteins (InstructProtein GO-MF sequences, cut at `--max_protein_length`) with a question, through its
processor (left padding); the bare LLM (the same Llama weights, as `LlamaForCausalLM`) gets the very same
`input_ids` with every `<protein>` placeholder replaced by ordinary text tokens, and the same attention mask. Both
decode greedily exactly `--new_tokens` tokens (`min_new_tokens` = `max_new_tokens`), with the KV cache; the time
includes the prompt pass (for SEPIT, the ESM-2 encoder). The two alternate call by call after a warm-up call.
Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/generation_throughput.py --parts outputs/tiny-parts
"""

import argparse
import json
import random
import statistics
import time

import torch
from transformers import LlamaForCausalLM

from dataset_card.external_benchmarks import GO_MF_FILE
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor

QUESTION = "What is the function of this protein? <protein>"


def timed_generate(model, inputs: dict, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert output.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", required=True)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_protein_length", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    protein, language = f"{args.parts}/protein_model", f"{args.parts}/language_model"
    processor = SepitProcessor.from_pretrained_parts(protein, language, max_protein_length=args.max_protein_length)
    sepit = SepitForConditionalGeneration.from_pretrained_parts(
        protein, language, protein_token_id=processor.protein_token_id
    ).eval()
    bare = LlamaForCausalLM.from_pretrained(language).eval()
    pad_id = processor.tokenizer.pad_token_id
    for model in (sepit, bare):
        model.generation_config.pad_token_id = pad_id
    sequences = [json.loads(line)["sequence"] for line in GO_MF_FILE.read_text().splitlines()]
    rng = random.Random(0)

    print(f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens, medians of {args.repeats} calls")
    print("| batch | prompt positions | SEPIT tokens/s | bare LLM tokens/s | SEPIT / bare |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size in (1, 8):
        chosen = rng.sample(sequences, batch_size)
        conversations = [[{"role": "user", "content": QUESTION}] for _ in chosen]
        inputs = processor.apply_chat_template(
            conversations,
            proteins=[[sequence] for sequence in chosen],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        placeholders = inputs["input_ids"] == processor.protein_token_id
        text_ids = torch.randint(10, processor.protein_token_id, inputs["input_ids"].shape)
        bare_inputs = {
            "input_ids": torch.where(placeholders, text_ids, inputs["input_ids"]),
            "attention_mask": inputs["attention_mask"],
        }
        timed_generate(sepit, inputs, args.new_tokens)
        timed_generate(bare, bare_inputs, args.new_tokens)
        sepit_times, bare_times = [], []
        for _ in range(args.repeats):
            sepit_times.append(timed_generate(sepit, inputs, args.new_tokens))
            bare_times.append(timed_generate(bare, bare_inputs, args.new_tokens))
        tokens = batch_size * args.new_tokens
        sepit_rate, bare_rate = tokens / statistics.median(sepit_times), tokens / statistics.median(bare_times)
        positions = inputs["input_ids"].shape[1]
        print(f"| {batch_size} | {positions} | {sepit_rate:.0f} | {bare_rate:.0f} | {sepit_rate / bare_rate:.2f} |")


if __name__ == "__main__":
    main()
