"""The command lines' parser and help. `--help` fits on a screen: what the script does and how it is called (its
docstring), its own arguments, and, for the trainer scripts, where the hundreds of inherited `TrainingArguments` /
`SFTConfig` options come from; `--help-all` still lists every one of them. Argument errors print one line."""

from __future__ import annotations

import argparse
import copy
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, fields

from transformers import HfArgumentParser

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


__all__ = ["SFT_CONFIG_DOCS", "TRAINING_ARGUMENTS_DOCS", "HelpFormatter", "script_parser"]
