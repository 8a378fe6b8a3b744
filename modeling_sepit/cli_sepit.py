"""The command lines' parser and help. `--help` fits on a screen: what the script does and how it is called (its
docstring), its own arguments, and, for the trainer scripts, where the hundreds of inherited `TrainingArguments` /
`SFTConfig` options come from; `--help-all` still lists every one of them. Argument errors print one line.

Also the checks the command lines run on arguments that the libraries would refuse only later, with a traceback: a
device that is not there, a dataset folder `load_dataset` cannot load, a trainer's output folder, resume point or
sample count."""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, fields
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .atomic_folder import check_output_path, claim_output_folder

WIDTH = 120
# (name, documentation) of the inherited trainer arguments, for `script_parser(..., trainer_arguments=...)`.
SFT_CONFIG_DOCS = ("TRL's SFTConfig", "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig")
TRAINING_ARGUMENTS_DOCS = (
    "transformers' TrainingArguments",
    "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments",
)
RECIPE_NOTE = (
    "--config RECIPE.yaml reads arguments from a YAML file, one `name: value` per argument (an `env:` mapping sets "
    "environment variables); flags on the command line override the recipe."
)
INHERITED_NOTE = (
    "Every other option is a field of {name} (output_dir, learning_rate, num_train_epochs, max_steps, "
    "per_device_train_batch_size, bf16, resume_from_checkpoint, ...), given as `--name value` or as a recipe key: "
    "see {url}. `{prog} --help-all` lists all {count} of them."
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's paragraphs and example commands as written, shows each argument's default, and names each
    argument once: HfArgumentParser also accepts `--dataset-name` for `--dataset_name`, which would double every
    line. 120 columns, as the docstrings are written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=WIDTH)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        shown.option_strings = [name for name in action.option_strings if not _is_alias(name, action.option_strings)]
        return super()._format_action_invocation(shown)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A required argument has no default to show ("(default: None)" would read as optional).
        return action.help if action.required else super()._get_help_string(action)


def _is_alias(name: str, names: list[str]) -> bool:
    """`--dataset-name`, the spelling HfArgumentParser adds next to `--dataset_name`."""
    return name.startswith("--") and "-" in name[2:] and "--" + name[2:].replace("-", "_") in names


class _PrintAndExit(argparse.Action):
    """A help flag whose text is built only when it is given; it exits 0 before anything else is parsed or run."""

    def __init__(self, option_strings: list[str], dest: str, text: Callable[[], str], help: str) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stdout.write(self.text())
        parser.exit()


def script_parser(
    dataclass_types: Sequence[type], description: str, trainer_arguments: tuple[str, str] | None = None
) -> HfArgumentParser:
    """The parser of a script whose arguments are `dataclass_types`; `--help` is a one-line usage, then `description`
    (the script's docstring: what it does, how it is called), then the arguments.

    `trainer_arguments` = (name, documentation URL) of the dataclasses after the first (TrainingArguments, SFTConfig):
    the script then takes `--config RECIPE.yaml` (TRL's `TrlParser`), `--help` lists only the first dataclass's
    arguments and says where the rest are documented, and `--help-all` lists them all."""
    recipe = trainer_arguments is not None
    options = {
        "description": description,
        "formatter_class": HelpFormatter,
        "usage": _usage(dataclass_types[0], recipe),
    }
    if not recipe:
        parser = HfArgumentParser(dataclass_types, **options)
    else:
        from trl import TrlParser  # the `train` extra; only the trainer scripts need it

        parser = TrlParser(dataclass_types, add_help=False, **options)
        name, url = trainer_arguments
        count = sum(len(fields(dataclass)) for dataclass in dataclass_types[1:])
        inherited = INHERITED_NOTE.format(name=name, url=url, prog=parser.prog, count=count)
        parser.epilog = "\n\n".join(textwrap.fill(note, WIDTH) for note in (RECIPE_NOTE, inherited))
        short = HfArgumentParser(dataclass_types[0], prog=parser.prog, epilog=parser.epilog, add_help=False, **options)
        help_text = "show what the script does and its own arguments, then exit"
        parser.add_argument("-h", "--help", action=_PrintAndExit, text=short.format_help, help=help_text)
        all_text = "show every argument, the inherited ones included, then exit"
        parser.add_argument("--help-all", action=_PrintAndExit, text=parser.format_help, help=all_text)
    parser.print_usage = lambda file=None: None  # argument errors print one line (`--help` still shows the usage)
    return parser


def _usage(arguments: type, recipe: bool) -> str:
    """Short, so that the description comes first: the `--config` form, or the required arguments (argparse's own
    usage lists every option, up to 80 lines of them)."""
    if recipe:
        return "%(prog)s --config RECIPE.yaml [--name value ...]\n       %(prog)s --help-all"
    required = [f"--{field.name} {field.name.upper()}" for field in fields(arguments) if _required(field)]
    return " ".join(["%(prog)s", *required, "[--name value ...]"])


def _required(field: Field) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def check_device(device: str, field: str = "device") -> str:
    """`device` if torch can place a model there now; else a ValueError naming `field` and the devices there are."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{field}: {device!r} is not a device ({error}); use cpu, cuda or cuda:N") from None
    if where.type == "cpu":
        return device
    if where.type == "cuda" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if where.index is None or where.index < count:
            return device
        raise ValueError(f"{field}: {device} but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
    if where.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"{field}: {device} is not available on this machine (no {where.type.upper()} device); use cpu")


def check_dataset(name: str, config: str | None, field: str = "dataset_name") -> None:
    """A ValueError naming `field` unless `load_dataset(name, config)` can load every split of a local folder: no
    loading script (datasets no longer runs them), the config exists, and each declared split has data files and
    rows. A Hub id is left to `load_dataset`."""
    folder = Path(name)
    if not folder.is_dir():
        return
    scripts = sorted(path.name for path in folder.glob("*.py"))
    if scripts:
        raise ValueError(
            f"{field}: {name} holds a loading script ({scripts[0]}), which datasets no longer runs; give a folder of "
            "data files (python -m dataset_card.build_dataset writes one)"
        )
    from datasets import load_dataset_builder  # the `train` extra; only the commands that read a dataset need it

    try:
        builder = load_dataset_builder(name, config)
    except Exception as error:  # noqa: BLE001 - whatever datasets refuses, the command line says so in one line
        raise ValueError(f"{field}: {name} (config {config!r}) cannot be loaded: {error}") from None
    declared = builder.info.splits or {}
    for split, files in (builder.config.data_files or {}).items():
        if not files:
            raise ValueError(
                f"{field}: {name} declares a {split!r} split (config {config!r}) but none of its data files is there "
                "(deleted?); rebuild the dataset"
            )
        if split in declared and declared[split].num_examples == 0:
            raise ValueError(
                f"{field}: the {split!r} split of {name} (config {config!r}) has no rows, which load_dataset refuses; "
                "rebuild the dataset with python -m dataset_card.build_dataset"
            )


def check_training_run(
    training_args: TrainingArguments,
    writer: str,
    inputs: Iterable[str | os.PathLike | None],
    overwrite: bool,
    max_train_samples: int | None = None,
) -> None:
    """The arguments of a trainer script that the Trainer would refuse only mid-run: `output_dir` (see
    `check_output_path`: it may not replace what the command did not write, nor touch an input), the resume point
    (`true` needs a checkpoint in `output_dir`; a path must be a checkpoint folder) and `max_train_samples`; also
    warns when bf16 on this CPU would be emulated (`warn_emulated_bf16`)."""
    warn_emulated_bf16(training_args)
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"max_train_samples must be >= 1 (or unset for every row), got {max_train_samples}")
    output_dir = check_output_path(training_args.output_dir, writer, inputs, overwrite)
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("", "false"):
        return
    if str(resume).lower() == "true":
        if not any(output_dir.glob("checkpoint-*/trainer_state.json")):
            raise ValueError(
                f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N folder to resume from; leave "
                "it out to start a new run"
            )
    elif not (Path(resume) / "trainer_state.json").is_file():
        what = "is not a checkpoint folder (no trainer_state.json)" if Path(resume).is_dir() else "does not exist"
        raise ValueError(
            f"resume_from_checkpoint: {resume} {what}; give a checkpoint-N folder of an earlier run, or true for the "
            "newest in output_dir"
        )


def cpu_has_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX); None where it cannot be told (not x86, or a
    torch without these private probes: a check that only warns must not stop a training script)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64") or None in probes:
        return None
    return any(probe() for probe in probes)


def warn_emulated_bf16(training_args: TrainingArguments) -> None:
    """bf16 autocast trains the SmolLM2 preset 1.4-1.5x faster on a CPU with bf16 instructions (benchmarks/README.md),
    but on one without them PyTorch emulates bf16 and the run is slower than float32: say so, with the fix, rather
    than let a recipe's `bf16: true` cost time silently."""
    on_cpu = training_args.use_cpu or not torch.accelerator.is_available()
    if training_args.bf16 and on_cpu and cpu_has_bf16() is False:
        warnings.warn(
            "bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so PyTorch emulates bf16 autocast and "
            "training runs slower than in float32; pass --bf16 false",
            stacklevel=2,
        )


def claim_training_output(
    training_args: TrainingArguments, writer: str, inputs: Iterable[str | os.PathLike | None], overwrite: bool
) -> None:
    """Mark `output_dir` as `writer`'s once every argument has been checked (only the saving process writes)."""
    if training_args.should_save:
        claim_output_folder(training_args.output_dir, writer, inputs, overwrite)


__all__ = [
    "SFT_CONFIG_DOCS",
    "TRAINING_ARGUMENTS_DOCS",
    "HelpFormatter",
    "check_dataset",
    "check_device",
    "check_training_run",
    "claim_training_output",
    "script_parser",
]
