"""Benchmarks at the paper's geometry: random-initialised parts with the exact shapes of ESM-2 650M and
TinyLlama-1.1B-Chat (or the smaller ESM-2 35M / 8M and SmolLM2-135M), as `training/build_geometry_parts.py` writes
them. Each row runs in its own process and measures against its baseline in the same run, alternating the systems
call by call (a burst of other load on a shared machine hits both alike; the ratios are what the rows report).

- `structure`: ESM encoder forward at L residues with the structure module (random-walk C-alpha coordinates, 3.8 A
  steps) against the same encoder on the sequence alone: time, and peak RSS growth over the call.
- `generation`: SEPIT generating from a real protein against the bare LLM (the same weights, shared) on a prompt of
  the same length, and against the sequence-as-text baseline (the LLM reading `<bop>SEQUENCE<eop>` as text: SEPIT's
  prompt with each protein's positions replaced by as many tokens as `--sequence_tokenizer`, a real tokenizer, writes
  `<bop>SEQUENCE<eop>` in; random ids, the weights being random anyway). One call per system generates the largest
  of `--new_tokens` and a stopping criterion clocks every new token, so the time to N tokens, for each N asked, and
  the prompt pass (the time to the first token) come from the same calls.
- `bf16`: the machine's matmul peak (2048 x 2048, fp32 and bf16), then SEPIT's prompt pass and one decoding step in
  fp32 and under bf16 autocast (and, after those, with the weights cast to bf16), with FLOPs counted by
  `torch.utils.flop_counter` and achieved FLOP/s as a fraction of the measured peak; logits compared with fp32.
- `training`: one optimizer step (forward, backward, AdamW) on one protein of L residues with its structure and a
  question and answer: stage 1 (everything trained) then stage 2 (upcycled to 4 experts, top-1, encoder and structure
  module frozen), each in fp32, fp32 with activation checkpointing and bf16 autocast, alternating step by step.

Peak memory: the rows that report it (structure, training) run with a fixed malloc mmap threshold (freed tensors go
back to the OS) and reset the kernel's peak-RSS mark (`/proc/self/clear_refs`) before each measured call; the figure
is VmHWM at the end minus VmRSS at the start (and VmHWM itself for training steps). The time-only rows keep glibc's
default, as a user's process does: a fresh mmap per tensor makes every allocation fault its pages in again. Usage,
from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/paper_geometry.py structure --parts outputs/paper-parts
    PYTHONPATH=. .venv/bin/python benchmarks/paper_geometry.py generation --parts outputs/paper-parts \\
        --sequence_tokenizer outputs/main/smollm2 --new_tokens 32 128 --batch_sizes 1 8
    PYTHONPATH=. .venv/bin/python benchmarks/paper_geometry.py bf16 --parts outputs/paper-parts
    PYTHONPATH=. .venv/bin/python benchmarks/paper_geometry.py training --parts outputs/train-parts
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM, StoppingCriteria  # noqa: E402

from dataset_card.external_benchmarks import GO_MF_FILE  # noqa: E402
from modeling_sepit import SepitDataCollator, SepitForConditionalGeneration, SepitProcessor  # noqa: E402
from modeling_sepit.pure_llm import BEGIN_PROTEIN, END_PROTEIN  # noqa: E402
from modeling_sepit.training_sepit import freeze_modules  # noqa: E402

QUESTION = "What is the function of this protein? <protein>"
ANSWER = (
    "This protein is a membrane-bound transporter that moves small organic anions across the plasma membrane in "
    "exchange for dicarboxylates. It binds its substrates with micromolar affinity, is regulated by phosphorylation of "
    "its cytoplasmic loop, and is expressed mainly in kidney and liver, where it takes part in the excretion of drugs "
    "and metabolic waste."
)
LIBC = ctypes.CDLL("libc.so.6")
# glibc's mallopt options: a fixed mmap threshold (no dynamic raise) so freed tensors go back to the OS, and the
# trim threshold, both at 64 KiB: set by main() once the arguments are read (an import or --help changes nothing).
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, FIXED_THRESHOLD = -3, -1, 65536
DEVICE = torch.device("cpu")  # set by --device
WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def measured(call: Callable[[], object]) -> tuple[float, float, float, object]:
    """Seconds, peak memory growth (MiB) and peak memory (MiB) of one call, and its result: resident set size on CPU,
    allocated memory on CUDA."""
    gc.collect()
    synchronize()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
        before = status_kib("VmRSS") / 1024
    start = time.perf_counter()
    result = call()
    synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else status_kib("VmHWM") / 1024
    return elapsed, peak - before, peak, result


def autocast_bf16():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16)


def load_sepit(
    parts: str, max_protein_length: int, dtype: torch.dtype = torch.float32
) -> tuple[SepitProcessor, SepitForConditionalGeneration]:
    protein, language = f"{parts}/protein_model", f"{parts}/language_model"
    processor = SepitProcessor.from_pretrained_parts(protein, language, max_protein_length=max_protein_length)
    model = SepitForConditionalGeneration.from_pretrained_parts(
        protein, language, protein_token_id=processor.protein_token_id, dtype=dtype
    ).to(DEVICE)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return processor, model.eval()


def sequences() -> list[str]:
    return [json.loads(line)["sequence"] for line in GO_MF_FILE.read_text().splitlines()]


def long_sequence(length: int) -> str:
    """`length` residues of real proteins: the longest GO-MF sequences joined (none reaches 1022 alone)."""
    joined = "".join(sorted(sequences(), key=len, reverse=True)[:3])
    return joined[:length]


def random_walk(length: int, seed: int = 0) -> list[list[float]]:
    """C-alpha-like coordinates: steps of 3.8 A in random directions."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.nn.functional.normalize(torch.randn(length, 3, generator=generator), dim=-1) * 3.8
    return steps.cumsum(0).tolist()


def protein_row(length: int) -> dict:
    """A training row: one protein of `length` residues with coordinates, a question and an answer."""
    return {
        "messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
        "sequence": long_sequence(length),
        "coords": random_walk(length),
        "coords_mask": [1] * length,
    }


def header(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {' '.join(sys.argv)}\n# {where}, torch {torch.__version__}, load {load:.2f}")


def structure_row(args: argparse.Namespace) -> None:
    processor, model = load_sepit(args.parts, args.length, WEIGHTS[args.weights])
    batch = SepitDataCollator(processor, structure_dropout=0.0)([protein_row(args.length)]).to(DEVICE)
    ids, mask = batch["protein_input_ids"], batch["protein_attention_mask"]
    coords, coords_mask = batch["protein_coords"], batch["protein_coords_mask"]
    encoder = model.model
    calls = {
        "with structure": lambda: encoder.get_protein_features(ids, mask, coords, coords_mask),
        "sequence only": lambda: encoder.get_protein_features(ids, mask),
    }
    results = {name: [] for name in calls}
    with torch.no_grad():
        for round_index in range(args.repeats + 1):  # round 0 warms up
            for name, call in calls.items():
                seconds, growth, _, _ = measured(call)
                if round_index:
                    results[name].append((seconds, growth))
    header(args)
    print(
        f"ESM {model.config.protein_config.num_hidden_layers}x{model.config.protein_config.hidden_size}, "
        f"{ids.shape[1]} positions, batch 1, medians of {args.repeats} alternating calls after a warm-up round"
    )
    print("| encoder forward | median s | peak RSS growth MiB (median) |")
    print("|---|---:|---:|")
    medians = {}
    for name, values in results.items():
        medians[name] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        print(f"| {name} | {medians[name][0]:.2f} | {medians[name][1]:.0f} |")
    (t1, m1), (t0, m0) = medians["with structure"], medians["sequence only"]
    print(f"with / without structure: time {t1 / t0:.2f}, peak memory growth {m1 / m0:.2f}")


def bare_llm(sepit: SepitForConditionalGeneration) -> LlamaForCausalLM:
    """A plain causal LM sharing SEPIT's LLM weights (no second copy of a 4 GB model in memory)."""
    with torch.device("meta"):
        bare = LlamaForCausalLM(sepit.config.text_config)
    bare.model = sepit.model.language_model
    bare.lm_head = sepit.lm_head
    bare.generation_config = GenerationConfig.from_model_config(sepit.config.text_config)
    bare.generation_config.pad_token_id = sepit.generation_config.pad_token_id
    return bare.eval()


def left_padded(lengths: list[int], low: int, high: int, pad_id: int) -> dict:
    """Random ids in [low, high) at the given lengths, left-padded, with their attention mask."""
    width = max(lengths)
    ids = torch.randint(low, high, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = pad_id
        mask[row, width - length :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TokenClock(StoppingCriteria):
    """Never stops generation; records the time at which each new token is appended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def token_seconds(model, inputs: dict, new_tokens: int) -> list[float]:
    """Seconds from the call's start to each of exactly `new_tokens` new tokens (greedy, KV cache)."""
    clock = TokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=[clock],
        )
    synchronize()
    assert output.shape[1] == inputs["input_ids"].shape[1] + new_tokens and len(clock.times) == new_tokens
    return [moment - start for moment in clock.times]


def sepit_prompt(processor: SepitProcessor, chosen: list[str]) -> dict:
    return processor.apply_chat_template(
        [[{"role": "user", "content": QUESTION}] for _ in chosen],
        proteins=[[sequence] for sequence in chosen],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(DEVICE)


def generation_row(args: argparse.Namespace) -> None:
    processor, sepit = load_sepit(args.parts, args.max_protein_length, WEIGHTS[args.weights])
    bare = bare_llm(sepit)
    text_tokenizer = AutoTokenizer.from_pretrained(args.sequence_tokenizer or f"{args.parts}/language_model")
    text_tokenizer.add_tokens([BEGIN_PROTEIN, END_PROTEIN], special_tokens=True)
    pool = [sequence[: args.max_protein_length] for sequence in sequences()]
    rng = random.Random(0)
    pad_id, protein_id = processor.tokenizer.pad_token_id, processor.protein_token_id
    longest = max(args.new_tokens)
    header(args)
    print(
        f"as-text prompts: SEPIT's text tokens + <bop>SEQUENCE<eop> as {text_tokenizer.name_or_path} writes it; "
        f"{args.weights} weights; one call of {longest} new tokens per system and round, clocked at every token; "
        f"medians of {args.repeats} rounds"
    )
    print(
        "| new tokens | batch | SEPIT / bare positions | as-text positions | SEPIT tok/s | bare tok/s | as-text tok/s "
        "| SEPIT / bare | SEPIT / as-text |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        chosen = rng.sample(pool, batch_size)
        inputs = sepit_prompt(processor, chosen)
        placeholders = inputs["input_ids"] == protein_id
        random_ids = torch.randint(10, protein_id, placeholders.shape).to(DEVICE)
        bare_inputs = {
            "input_ids": torch.where(placeholders, random_ids, inputs["input_ids"]),
            "attention_mask": inputs["attention_mask"],
        }
        # The same prompt with each protein's placeholders replaced by `<bop>SEQUENCE<eop>` as the tokenizer writes it.
        written = [
            len(text_tokenizer(f"{BEGIN_PROTEIN}{sequence}{END_PROTEIN}", add_special_tokens=False)["input_ids"])
            for sequence in chosen
        ]
        text_positions = (inputs["attention_mask"].bool() & ~placeholders).sum(-1).tolist()
        as_text_lengths = [text + count for text, count in zip(text_positions, written, strict=True)]
        as_text = {k: v.to(DEVICE) for k, v in left_padded(as_text_lengths, 10, protein_id, pad_id).items()}
        systems = {"SEPIT": (sepit, inputs), "bare": (bare, bare_inputs), "as-text": (bare, as_text)}
        protein_inputs = [inputs[name] for name in ("protein_input_ids", "protein_attention_mask")]
        clocks = {name: [] for name in systems}
        encoder = []
        for model, model_inputs in systems.values():  # warm-up on the first prompt: every weight read once
            token_seconds(model, {name: value[:1] for name, value in model_inputs.items()}, 2)
        for _ in range(args.repeats):
            for name, (model, model_inputs) in systems.items():
                clocks[name].append(token_seconds(model, model_inputs, longest))
            # The profile's missing piece: SEPIT's ESM encoder alone on the same proteins.
            with torch.no_grad():
                encoder.append(measured(lambda p=protein_inputs: sepit.model.get_protein_features(*p))[0])
            reached = {name: [round(values[-1][n - 1], 2) for n in args.new_tokens] for name, values in clocks.items()}
            print(f"# round, batch {batch_size}: seconds to {args.new_tokens} tokens {json.dumps(reached)}", flush=True)
        for new_tokens in args.new_tokens:
            seconds = {name: [clock[new_tokens - 1] for clock in values] for name, values in clocks.items()}
            rate = {name: batch_size * new_tokens / statistics.median(values) for name, values in seconds.items()}
            cells = (
                new_tokens,
                batch_size,
                f"{inputs['input_ids'].shape[1]}",
                f"{as_text['input_ids'].shape[1]}",
                f"{rate['SEPIT']:.2f}",
                f"{rate['bare']:.2f}",
                f"{rate['as-text']:.2f}",
                f"{rate['SEPIT'] / rate['bare']:.2f}",
                f"{rate['SEPIT'] / rate['as-text']:.2f}",
            )
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            print(f"# raw seconds to {new_tokens} tokens: {json.dumps(seconds)}", flush=True)
        first = {name: statistics.median(clock[0] for clock in values) for name, values in clocks.items()}
        step = {
            name: statistics.median((clock[-1] - clock[0]) / max(longest - 1, 1) for clock in values)
            for name, values in clocks.items()
        }
        print(
            f"# profile, batch {batch_size}: prompt pass (time to the first token) SEPIT {first['SEPIT']:.3f} s (ESM "
            f"encoder alone {statistics.median(encoder):.3f} s) vs bare {first['bare']:.3f} s vs as-text "
            f"{first['as-text']:.3f} s; decoding per step SEPIT {step['SEPIT']:.4f} s vs bare {step['bare']:.4f} s vs "
            f"as-text {step['as-text']:.4f} s; encoder runs: {json.dumps(encoder)}",
            flush=True,
        )


def matmul_peak(dtype: torch.dtype, calls: int = 10) -> float:
    """Median GFLOP/s of a square matmul in `dtype`: 2048 wide on CPU (the issue's figure), 8192 on CUDA."""
    size = 8192 if DEVICE.type == "cuda" else 2048
    a, b = torch.randn(size, size, dtype=dtype, device=DEVICE), torch.randn(size, size, dtype=dtype, device=DEVICE)
    times = []
    for index in range(calls + 2):
        synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def counted_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def bf16_row(args: argparse.Namespace) -> None:
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    processor, sepit = load_sepit(args.parts, args.max_protein_length)
    chosen = random.Random(0).sample([s[: args.max_protein_length] for s in sequences()], 1)
    inputs = sepit_prompt(processor, chosen)
    contexts = {"fp32": nullcontext, "bf16 autocast": autocast_bf16}

    def prompt_pass(name: str):
        with torch.no_grad(), contexts[name]():
            return sepit(**inputs, use_cache=True, logits_to_keep=0)

    def decode_step(name: str, state: dict):
        with torch.no_grad(), contexts[name]():
            output = sepit(input_ids=state["next"], attention_mask=state["mask"], cache=state["cache"], use_cache=True)
        state["next"] = output.logits[:, -1:].argmax(-1)
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["next"])], dim=1)

    flops_prompt = counted_flops(lambda: prompt_pass("fp32"))
    states, prompt_logits = {}, {}
    results = {name: {"prompt": [], "decode": []} for name in contexts}
    for round_index in range(args.repeats + 1):
        for name in contexts:
            seconds, _, _, output = measured(lambda name=name: prompt_pass(name))
            prompt_logits[name] = output.logits[:, -1].float()
            states[name] = {
                "cache": output.past_key_values,
                "next": output.logits[:, -1:].argmax(-1),
                "mask": torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long, device=DEVICE)], dim=1),
            }
            if round_index:
                results[name]["prompt"].append(seconds)
        for _ in range(2):
            for name in contexts:
                seconds, _, _, _ = measured(lambda name=name: decode_step(name, states[name]))
                if round_index:
                    results[name]["decode"].append(seconds)
    state = states["fp32"]
    flops_decode = counted_flops(lambda: decode_step("fp32", state))
    difference = (prompt_logits["bf16 autocast"] - prompt_logits["fp32"]).abs().max().item()
    spread = prompt_logits["fp32"].std().item()
    same_top = bool((prompt_logits["bf16 autocast"].argmax(-1) == prompt_logits["fp32"].argmax(-1)).all())

    sepit.to(torch.bfloat16)  # bf16 weights: what loading with dtype=torch.bfloat16 gives
    contexts["bf16 weights"] = nullcontext
    results["bf16 weights"] = {"prompt": [], "decode": []}
    for round_index in range(args.repeats + 1):
        seconds, _, _, output = measured(lambda: prompt_pass("bf16 weights"))
        states["bf16 weights"] = {
            "cache": output.past_key_values,
            "next": output.logits[:, -1:].argmax(-1),
            "mask": torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long, device=DEVICE)], dim=1),
        }
        if round_index:
            results["bf16 weights"]["prompt"].append(seconds)
        for _ in range(2):
            seconds, _, _, _ = measured(lambda: decode_step("bf16 weights", states["bf16 weights"]))
            if round_index:
                results["bf16 weights"]["decode"].append(seconds)

    header(args)
    print(f"matmul 2048x2048 peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(
        f"prompt of {inputs['input_ids'].shape[1]} positions ({flops_prompt / 1e9:.0f} GFLOP counted), decoding "
        f"step {flops_decode / 1e9:.2f} GFLOP; medians of {args.repeats} prompt passes and {2 * args.repeats} steps"
    )
    print("| SEPIT generation | prompt pass s | GFLOP/s | of peak | decoding step s | GFLOP/s | of peak | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(results["fp32"]["prompt"]), statistics.median(results["fp32"]["decode"])
    for name, values in results.items():
        prompt_s, decode_s = statistics.median(values["prompt"]), statistics.median(values["decode"])
        peak = peaks["fp32" if name == "fp32" else "bf16"]
        prompt_rate, decode_rate = flops_prompt / prompt_s / 1e9, flops_decode / decode_s / 1e9
        print(
            f"| {name} | {prompt_s:.2f} | {prompt_rate:.0f} | {prompt_rate / peak:.2f} | {decode_s:.3f} | "
            f"{decode_rate:.0f} | {decode_rate / peak:.3f} | prompt {base[0] / prompt_s:.2f}x, "
            f"step {base[1] / decode_s:.2f}x |"
        )
    print(
        f"bf16 autocast vs fp32, last-position logits of the prompt: max |diff| {difference:.3g} (fp32 logits' "
        f"std {spread:.3g}), same top-1 token: {same_top}"
    )


def training_step(model, optimizer, batch: dict, autocast: bool) -> None:
    with autocast_bf16() if autocast else nullcontext():
        output = model(**batch)
        loss = output.loss + (output.aux_loss if getattr(output, "aux_loss", None) is not None else 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_stage(model, batch: dict, variants: dict, repeats: int) -> tuple[int, dict]:
    """FLOPs of one fp32 step and (seconds, peak growth, peak) per step of each variant, alternating step by step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = counted_flops(lambda: training_step(model, optimizer, batch, autocast=False))
    results = {name: [] for name in variants}
    for round_index in range(repeats + 1):  # round 0 warms up
        for name, (checkpointing, autocast) in variants.items():
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            seconds, growth, peak, _ = measured(
                lambda autocast=autocast: training_step(model, optimizer, batch, autocast)
            )
            if checkpointing:
                model.gradient_checkpointing_disable()
            if round_index:
                results[name].append((seconds, growth, peak))
    print(f"# {trained / 1e6:.0f}M parameters trained, {flops / 1e12:.2f} TFLOP per fp32 step", flush=True)
    return flops, results


def training_row(args: argparse.Namespace) -> None:
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    processor, model = load_sepit(args.parts, args.length)
    batch = SepitDataCollator(processor, structure_dropout=0.0)([protein_row(args.length)]).to(DEVICE)
    variants = {"fp32": (False, False), "fp32, activation checkpointing": (True, False), "bf16 autocast": (False, True)}
    results, flops = {}, {}
    for stage in ("stage 1", "stage 2"):
        if stage == "stage 2":
            model = model.upcycle_to_moe(num_experts=4, num_experts_per_tok=1)
            model.config.text_config.output_router_logits = True
            freeze_modules(model, ["protein_model", "structure_module"])
        flops[stage], stage_results = time_stage(model, batch, variants, args.repeats)
        results.update({(stage, name): values for name, values in stage_results.items()})
    header(args)
    config = model.config
    print(
        f"ESM {config.protein_config.num_hidden_layers}x{config.protein_config.hidden_size}, LLM "
        f"{config.text_config.num_hidden_layers}x{config.text_config.hidden_size}; one protein of {args.length} "
        f"residues with structure, {batch['input_ids'].shape[1]} LLM positions, batch 1; matmul peak fp32 "
        f"{peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; medians of {args.repeats} steps"
    )
    print("| stage | variant | median s/step | peak RSS MiB | growth over the step MiB | GFLOP/s | of peak |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (stage, name), values in results.items():
        seconds = statistics.median(v[0] for v in values)
        rate = flops[stage] / seconds / 1e9
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        print(
            f"| {stage} | {name} | {seconds:.2f} | {statistics.median(v[2] for v in values):.0f} | "
            f"{statistics.median(v[1] for v in values):.0f} | {rate:.0f} | {rate / peak:.2f} |"
        )
    for name in variants:
        ratio = statistics.median(v[0] for v in results[("stage 2", name)]) / statistics.median(
            v[0] for v in results[("stage 1", name)]
        )
        print(f"stage 2 / stage 1 ({name}): {ratio:.2f} (goal <= 1.25)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s {structure,generation,bf16,training} --parts PARTS [--name value ...]",
    )
    parser.add_argument("row", choices=["structure", "generation", "bf16", "training"])
    parser.add_argument("--parts", required=True, help="Folder with protein_model/ and language_model/.")
    parser.add_argument("--length", type=int, default=1022, help="Residues of the protein (structure, training).")
    parser.add_argument("--max_protein_length", type=int, default=512, help="Residues kept (generation, bf16).")
    parser.add_argument(
        "--new_tokens", type=int, nargs="+", default=[32], help="Answer lengths timed (generation; one call each)."
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--sequence_tokenizer", help="Tokenizer that writes the as-text prompt (default: the LLM's).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument(
        "--weights", choices=sorted(WEIGHTS), default="fp32", help="Weights dtype (structure, generation)."
    )
    args = parser.parse_args()
    # Only for the rows that report memory: with every tensor over 64 KiB a fresh mmap, each allocation faults its
    # pages in again (about 0.9 s more per ESM-2 650M pass on 299 positions), which would bias the time-only rows.
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) if args.row in ("structure", "training") else ():
        if LIBC.mallopt(option, FIXED_THRESHOLD) != 1:
            raise RuntimeError(
                f"mallopt({option}, {FIXED_THRESHOLD}) failed: peak-memory figures would not be comparable"
            )
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    {"structure": structure_row, "generation": generation_row, "bf16": bf16_row, "training": training_row}[args.row](
        args
    )


if __name__ == "__main__":
    main()
