# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "torch==2.13.0",
#     "transformers==5.24.0",
#     "huggingface-hub>=2.4",
#     "safetensors>=0.8",
#     "biotite>=1.6",
#     "biopython>=1.85",
#     "accelerate==1.15.0",
#     "datasets==5.2.0",
#     "peft==0.21.2",
#     "trl==1.16.0",
# ]
#
# [tool.hf-jobs]
# flavor = "a10g-small"
# timeout = "2h"
# secrets = ["HF_TOKEN"]
# ///
"""Fine-tune a pushed SEPIT model (LoRA or full) on a dataset in this project's format with TRL's SFTTrainer, evaluate
it on the validation split and push the result to a model repo: the merged model at its root (loads with
`pipeline("protein-qa", model=REPO, trust_remote_code=True)`), the LoRA adapter in `adapter/`, and a model card with
the base model, the dataset, the metrics and this command. Self-contained (a uv script): the model, processor and
collator come from the model repo's own code, so it runs unchanged as

    hf jobs uv run examples/hub_finetune.py --model me/sepit --dataset me/sepit-data --output_repo me/sepit-ft
    uv run examples/hub_finetune.py ...        or        python examples/hub_finetune.py ...   (this project's venv)

Checkpoints go to the output repo's `training-checkpoints` branch as they are saved (`hub_strategy="checkpoint"`);
the same command run again (a Job's next attempt after preemption) resumes from the last one. Losses go to Trackio
when TRACKIO_SPACE_ID is set, to Weights & Biases when WANDB_API_KEY is set, or wherever `--report_to` says.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import textwrap
import warnings
from pathlib import Path
from typing import NoReturn

import torch
from datasets import DatasetDict, load_dataset
from huggingface_hub import DatasetCard, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig
from transformers import AutoModel, AutoProcessor, HfArgumentParser, TrainerCallback
from trl import SFTConfig, SFTTrainer

WRITER = "hub_finetune"
MARKER = ".sepit-output"  # this project's record of which command wrote a folder
CHECKPOINT_BRANCH = "training-checkpoints"
LAST_CHECKPOINT = "last-checkpoint"  # where `hub_strategy="checkpoint"` puts the newest checkpoint
# SFTConfig settings this script decides (where checkpoints go, how the collator gets its rows).
MANAGED = {
    "output_dir",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_revision",
    "hub_private_repo",
    "remove_unused_columns",
    "dataset_kwargs",
    "resume_from_checkpoint",
}
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER_PROJECTIONS = ("query", "key", "value")
TRACKERS = {"TRACKIO_SPACE_ID": "trackio", "WANDB_API_KEY": "wandb"}  # environment variable -> `report_to`


# Training settings unless the command line gives others (SFTConfig's own defaults for the rest).
LEARNING_RATES = {"lora": "2e-4", "full": "2e-5"}  # by --method: common LoRA settings; TRL's default for full
TRAINING_DEFAULTS = {
    "num_train_epochs": "1",
    "per_device_train_batch_size": "4",
    "save_steps": "200",
    "save_total_limit": "1",
    "logging_steps": "10",
}


class OneLineErrors(argparse.ArgumentParser):
    """Argument errors as one line (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class TrainingOptions(OneLineErrors, HfArgumentParser):
    """SFTConfig's own options, passed through from the command line."""


class HelpAll(argparse.Action):
    """`--help-all`: this script's options, then every SFTConfig option."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        parser.print_help()
        TrainingOptions(SFTConfig, prog=parser.prog).print_help()
        parser.exit()


def script_parser() -> OneLineErrors:
    doc = __doc__ or ""
    parser = OneLineErrors(
        prog="hub_finetune.py",
        allow_abbrev=False,  # an SFTConfig option must never be taken for an abbreviation of one of these
        usage="%(prog)s --model REPO --dataset REPO --output_repo REPO [options] [SFTConfig options]",
        description=doc,
        epilog=textwrap.fill(
            "Any other option is an SFTConfig field, e.g. --num_train_epochs 3 --learning_rate 1e-4 --bf16 true "
            "--max_steps 100 --save_steps 200 --report_to trackio (--help-all lists them). Defaults here: "
            + " ".join(f"--{name} {value}" for name, value in TRAINING_DEFAULTS.items())
            + f"; --learning_rate {LEARNING_RATES['lora']} (LoRA) or {LEARNING_RATES['full']} (full); bf16 on a GPU "
            "that has it.",
            width=120,
        ),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=40, width=120),
    )
    add = parser.add_argument
    add("--model", required=True, help="SEPIT model repo on the Hub (or a local folder) to fine-tune")
    add("--dataset", required=True, help="dataset repo (or folder) written by python -m dataset_card.build_dataset")
    add("--output_repo", required=True, help="model repo that receives the result (created if missing)")
    add("--dataset_config", default="instructions", choices=("instructions", "captions"), help="default: instructions")
    add(
        "--method",
        default="lora",
        choices=("lora", "full"),
        help="LoRA adapters + projector (default), or every weight",
    )
    add("--lora_r", type=int, default=16, help="rank of the adapters (default: 16)")
    add("--lora_alpha", type=int, default=32, help="adapter scale numerator, scale = alpha / r (default: 32)")
    add("--lora_dropout", type=float, default=0.05, help="dropout on the adapters' input (default: 0.05)")
    add("--lora_encoder", action="store_true", help="also adapt the ESM-2 self-attention (query, key, value)")
    add(
        "--structure_dropout",
        type=float,
        default=0.0,
        help="probability of withholding a protein's structure (default: 0)",
    )
    add("--max_protein_length", type=int, default=None, help="residues kept per protein (default: the processor's)")
    add("--max_train_samples", type=int, default=None, help="train on the first N rows only")
    add("--max_eval_samples", type=int, default=None, help="evaluate on the first N validation rows only")
    add(
        "--dtype", default="auto", help="dtype the weights load in: auto (the checkpoint's, default), float32, bfloat16"
    )
    add("--private", action="store_true", help="create the output repo private")
    add(
        "--output_dir",
        default="hub-finetune",
        help="local working folder: checkpoints, the folder pushed (default: hub-finetune)",
    )
    add("--overwrite", action="store_true", help="use --output_dir even if it holds files of something else")
    add("--help-all", action=HelpAll, nargs=0, help="also list every SFTConfig option")
    return parser


def fail(message: str) -> NoReturn:
    """One line on stderr and exit 2: what was wrong and what would do."""
    print(f"hub_finetune.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, SFTConfig]:
    """This script's options, then SFTConfig's from the rest (the command line's values over `TRAINING_DEFAULTS`)."""
    parser = script_parser()
    args, rest = parser.parse_known_args(argv)
    training_parser = TrainingOptions(SFTConfig, prog=parser.prog, allow_abbrev=False)
    given = {token.removeprefix("--").split("=")[0].replace("-", "_") for token in rest if token.startswith("--")}
    if given & MANAGED:
        fail(f"--{sorted(given & MANAGED)[0]} is set by this script (checkpoints go to --output_repo); leave it out")
    defaults = [token for name, value in TRAINING_DEFAULTS.items() for token in (f"--{name}", value)]
    defaults += ["--learning_rate", LEARNING_RATES[args.method]]
    if "report_to" not in given:
        defaults += ["--report_to", next((TRACKERS[var] for var in TRACKERS if os.environ.get(var)), "none")]
    if not given & {"bf16", "fp16"}:
        defaults += ["--bf16", str(torch.cuda.is_available() and torch.cuda.is_bf16_supported())]
    _, unknown = training_parser.parse_known_args([*defaults, *rest])
    if unknown:
        fail(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with warnings.catch_warnings():  # SFTConfig's own default still sets the deprecated `gradient_checkpointing`
            warnings.filterwarnings("ignore", "`gradient_checkpointing` is deprecated", FutureWarning)
            (training_args,) = training_parser.parse_args_into_dataclasses(args=[*defaults, *rest])
    except ValueError as error:  # SFTConfig's own checks of a combination of values
        fail(error)
    return args, training_args


def check_arguments(args: argparse.Namespace, training_args: SFTConfig) -> None:
    """Refuse what would fail later, after the downloads, or lose the result."""
    if constants.HF_HUB_OFFLINE:
        fail("HF_HUB_OFFLINE=1: the result and the checkpoints are pushed to the Hub; unset it")
    for name in ("model", "dataset", "output_repo"):
        value = getattr(args, name)
        if name == "output_repo" or not Path(value).is_dir():
            try:
                validate_repo_id(value)
            except HFValidationError:
                fail(f"--{name}: {value} is neither a local folder nor a Hub repo id (owner/name)")
    if args.output_repo == args.model:
        fail(f"--output_repo {args.output_repo} is --model: the result would replace its base; name a new repo")
    if args.lora_r < 1:
        fail(f"--lora_r must be >= 1 (the adapters' rank), got {args.lora_r}")
    if not 0.0 <= args.structure_dropout <= 1.0:
        fail(f"--structure_dropout must be in [0, 1], got {args.structure_dropout}")
    for name in ("max_protein_length", "max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    for tracker in training_args.report_to:
        if tracker in TRACKERS.values() and importlib.util.find_spec(tracker) is None:
            fail(f"--report_to {tracker}: {tracker} is not installed (hf jobs uv run --with {tracker} ...)")


def claim_work_folder(folder: Path, inputs: list[str], overwrite: bool) -> None:
    """The project's rule for output folders: a new or empty folder, or this script's own earlier one, and never a
    folder that holds an input or lies inside one."""
    for given in inputs:
        source = Path(given).resolve()
        if Path(given).is_dir() and (source == folder.resolve() or folder.resolve() in source.parents):
            fail(f"--output_dir: {folder} holds the input {given}; choose another folder")
        if Path(given).is_dir() and source in folder.resolve().parents:
            fail(f"--output_dir: {folder} lies inside the input {given}; choose another folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        try:
            writer = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("writer")
        except (OSError, ValueError, AttributeError):
            writer = None
        if writer != WRITER:
            fail(f"--output_dir: {folder} holds files this script did not write; choose a new or empty folder, or "
                 "--overwrite")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"writer": WRITER}) + "\n", encoding="utf-8")


def model_copy(api: HfApi, name: str) -> Path:
    """A local folder as is; a Hub repo downloaded whole (its own code included), without training checkpoints."""
    if Path(name).is_dir():
        return Path(name)
    ignore = [f"{LAST_CHECKPOINT}/*", "checkpoint-*/*"]
    return Path(api.snapshot_download(name, ignore_patterns=ignore))


def load_splits(api: HfApi, name: str, config: str) -> DatasetDict:
    """A local folder: `load_dataset(folder, config)`. A Hub repo: its card, then only the Parquet files of `config`
    (the other config of a Swiss-Prot-scale set is as large again), read by split as the card's `configs` name them."""
    if Path(name).is_dir():
        return load_dataset(name, config)
    card = Path(api.snapshot_download(name, repo_type="dataset", allow_patterns="README.md")) / "README.md"
    configs = (DatasetCard.load(card).data.get("configs") or []) if card.is_file() else []
    splits = {
        files["split"]: [files["path"]] if isinstance(files["path"], str) else files["path"]
        for entry in configs
        if entry.get("config_name") == config
        for files in entry.get("data_files", [])
    }
    if not splits:
        raise ValueError(f"--dataset: {name} declares no config {config!r} in its card (build it with dataset_card)")
    patterns = [pattern for paths in splits.values() for pattern in paths]
    folder = Path(api.snapshot_download(name, repo_type="dataset", allow_patterns=patterns))
    data_files = {split: [str(folder / path) for path in paths] for split, paths in splits.items()}
    return load_dataset("parquet", data_files=data_files)


def last_checkpoint(api: HfApi, repo: str, private: bool, work: Path) -> Path | None:
    """Create the output repo and its checkpoint branch if missing; the newest checkpoint pushed there by an earlier
    attempt of this run, downloaded, or None."""
    api.create_repo(repo, private=private, exist_ok=True)
    api.create_branch(repo, branch=CHECKPOINT_BRANCH, exist_ok=True)
    target = work / "resume"
    shutil.rmtree(target, ignore_errors=True)
    api.snapshot_download(repo, revision=CHECKPOINT_BRANCH, allow_patterns=f"{LAST_CHECKPOINT}/*", local_dir=target)
    checkpoint = target / LAST_CHECKPOINT
    return checkpoint if (checkpoint / "trainer_state.json").is_file() else None


def lora_config(args: argparse.Namespace) -> LoraConfig:
    """Adapters on every LLM decoder layer's attention and MLP projections (each expert's, for an MoE model), and on
    the ESM-2 attention with --lora_encoder; the projector trains whole (`modules_to_save`). The pattern is anchored
    so that a `value` or `dense` elsewhere in the model never gets an adapter (as training/finetune_lora.py)."""
    projections = "|".join(LLM_PROJECTIONS)
    target = rf"model\.language_model\.layers\.\d+\.(?:self_attn|mlp|mlp\.experts\.\d+)\.(?:{projections})"
    if args.lora_encoder:
        encoder = "|".join(ENCODER_PROJECTIONS)
        target = rf"(?:{target})|(?:model\.protein_model\.encoder\.layer\.\d+\.attention\.self\.(?:{encoder}))"
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )


class StructureDrawsPerEpoch(TrainerCallback):
    """Tells the collator which epoch begins, so that structure dropout draws anew at every visit (and, after a
    resume, as the uninterrupted run would have)."""

    def __init__(self, collator: object) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.collator.set_epoch(int(state.epoch or 0))


def save_with_remote_code(model: torch.nn.Module, processor: object, base: Path, folder: Path) -> None:
    """Weights, config and processor, plus the base folder's remote code: a model loaded with `trust_remote_code`
    saves only its modeling files, and the `protein-qa` pipeline code (and `custom_pipelines` in config.json) must
    come along for `pipeline("protein-qa", ...)` to load the folder."""
    pipelines = model.config.to_dict().get("custom_pipelines")
    if pipelines:
        del model.config.custom_pipelines  # restored below, once the code it names is in the folder
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for source in base.glob("*.py"):
        if not (folder / source.name).exists():
            shutil.copy(source, folder / source.name)
    if pipelines:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["custom_pipelines"] = pipelines
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_card(
    args: argparse.Namespace, base: Path, metrics: dict[str, float], trained: dict[str, object], command: str
) -> ModelCard:
    """Hub metadata (base model, dataset, task tags; the base's license) and what was trained, how, and what the
    validation split measured."""
    license_ = ModelCard.load(base / "README.md").data.license if (base / "README.md").is_file() else None
    data = ModelCardData(
        license=license_,
        library_name="transformers",
        pipeline_tag="other",  # no Hub task takes a protein: a text-generation widget could not pass one
        tags=["sepit", "protein-qa", "protein", "biology", "custom_code", "trl", "sft", args.method],
        base_model=None if Path(args.model).is_dir() else [args.model],
        datasets=None if Path(args.dataset).is_dir() else [args.dataset],
    )
    how = (
        f"LoRA (r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}) on the LLM's attention and MLP "
        + ("and ESM-2's attention " if args.lora_encoder else "")
        + "projections, the projector trained whole, merged into the weights here (the adapter alone: `adapter/`)"
        if args.method == "lora"
        else "full fine-tuning (every weight)"
    )
    settings = "\n".join(f"| {name} | {value} |" for name, value in trained.items())
    results = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    text = f"""---
{data.to_yaml()}
---

# {args.output_repo}

SEPIT (Structure-Enhanced Protein Instruction Tuning, [arXiv 2410.03553](https://arxiv.org/abs/2410.03553)) fine-tuned
from `{args.model}` on `{args.dataset}` (config `{args.dataset_config}`) with TRL's `SFTTrainer`: {how}.

## Usage

```python
from transformers import pipeline

qa = pipeline("protein-qa", model="{args.output_repo}", trust_remote_code=True)
qa({{"question": "What is the function of <protein> ?", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"}})
```

## Training

| setting | value |
|---|---|
{settings}

Made by `examples/hub_finetune.py` (run with `hf jobs uv run`, `uv run` or `python`) with

```bash
{command}
```

## Evaluation (validation split)

| metric | value |
|---|---|
{results}
"""
    return ModelCard(text)


def main(argv: list[str] | None = None) -> int:
    args, training_args = parse(argv)
    check_arguments(args, training_args)
    work = Path(args.output_dir)
    claim_work_folder(work, [args.model, args.dataset], args.overwrite)
    api = HfApi()
    try:
        base = model_copy(api, args.model)
        processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
        model = AutoModel.from_pretrained(base, trust_remote_code=True, dtype=args.dtype)
        if model.config.model_type != "sepit":
            raise ValueError(f"--model: {args.model} is a {model.config.model_type!r} model, not a SEPIT one")
        splits = load_splits(api, args.dataset, args.dataset_config)
        if "train" not in splits:
            raise ValueError(f"--dataset: {args.dataset} ({args.dataset_config}) has no train split")
        resume = last_checkpoint(api, args.output_repo, args.private, work)  # only once the inputs load
    except (ValueError, OSError) as error:  # a repo that is not there, not SEPIT, or not this project's dataset
        fail(error)
    if args.max_protein_length is not None:
        processor.max_protein_length = args.max_protein_length
    train = splits["train"]
    evaluation = splits.get("validation")
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if evaluation is not None and args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))

    training_args.output_dir = str(work / "checkpoints")
    training_args.remove_unused_columns = False  # the collator reads the protein columns itself
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}  # TRL's preparation keeps only text columns
    training_args.push_to_hub = True
    training_args.hub_model_id = args.output_repo
    training_args.hub_strategy = "checkpoint"
    training_args.hub_revision = CHECKPOINT_BRANCH
    training_args.hub_private_repo = args.private
    if model.config.text_config.num_experts is None:
        training_args.router_aux_loss_coef = 0.0  # a dense LLM has no router logits
    collator = processor.get_data_collator(structure_dropout=args.structure_dropout, seed=training_args.seed)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=processor,
        peft_config=lora_config(args) if args.method == "lora" else None,
        callbacks=[StructureDrawsPerEpoch(collator)],
    )
    resumed_step = None
    if resume is not None:
        resumed_step = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        print(f"resuming from {args.output_repo}@{CHECKPOINT_BRANCH}/{LAST_CHECKPOINT} (step {resumed_step})")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    metrics = trainer.evaluate() if evaluation is not None else {}
    metrics = {name: value for name, value in metrics.items() if name in ("eval_loss", "eval_mean_token_accuracy")}
    metrics["train_loss"] = result.training_loss
    print("metrics: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))

    upload = work / "upload"
    shutil.rmtree(upload, ignore_errors=True)
    trained = trainer.model
    if args.method == "lora":
        trained.save_pretrained(upload / "adapter")
        (upload / "adapter" / "README.md").unlink()  # PEFT's blank template naming the download folder; see the card
        adapter_config = upload / "adapter" / "adapter_config.json"
        adapter = json.loads(adapter_config.read_text(encoding="utf-8"))
        adapter["base_model_name_or_path"] = args.model  # the repo id, not this machine's download folder
        adapter_config.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        trained = trained.merge_and_unload()
    save_with_remote_code(trained, processor, base, upload)
    settings = {
        "method": args.method,
        "dataset rows (train / validation)": f"{len(train)} / {len(evaluation) if evaluation is not None else 0}",
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 2),
        "learning rate": training_args.learning_rate,
        "batch size (per device x accumulation)": (
            f"{training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps}"
        ),
        "structure dropout": args.structure_dropout,
        "resumed from step": resumed_step if resumed_step is not None else "-",
    }
    command = shlex.join(["hub_finetune.py", *(sys.argv[1:] if argv is None else argv)])
    model_card(args, base, metrics, settings, command).save(upload / "README.md")
    commit = api.upload_folder(
        repo_id=args.output_repo, folder_path=upload, commit_message=f"SEPIT {args.method} fine-tuning: {command}"
    )
    api.delete_branch(args.output_repo, branch=CHECKPOINT_BRANCH)  # the run is complete: nothing left to resume
    print(f"pushed: {commit}")
    print(f"model: {constants.ENDPOINT}/{args.output_repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
