"""`--help` of every command line (found by `command_lines`, so a new script is covered at once): exit 0, nothing
started and nothing written; a short usage, then what the script does (its docstring), all on a screen; the trainer
scripts show the `--config RECIPE.yaml` form with a tiny recipe and keep every inherited option one flag away
(`--help-all`)."""

import ast
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import transformers

from tests.conftest import CONSOLE_SCRIPTS, ROOT, command_lines, run_command_line

COMMAND_LINES = command_lines()
# The trainer scripts and a tiny recipe of each.
CONFIG_DRIVEN = {
    "training/sft.py": "stage1.yaml",
    "training/finetune_lora.py": "lora.yaml",
    "training/stage0_encoder_warmup.py": "stage0.yaml",
    "training/pure_llm.py": "pure_llm.yaml",
}
MAX_LINES = 80


@pytest.fixture
def nothing_started(tmp_path, monkeypatch):
    """An empty working folder, which must stay empty; no process, fork or training run may start."""

    def forbidden(*args, **kwargs):
        raise AssertionError("--help started work")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(os, "fork", forbidden)
    for name in ("execv", "execve", "execvp", "execvpe"):  # a re-exec would replace the test process itself
        monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(transformers.Trainer, "train", forbidden)
    yield
    assert list(tmp_path.iterdir()) == []


def docstring(argv: list[str]) -> str:
    """The module docstring of what a command line runs: its description."""
    if argv[0].endswith(".py"):
        path = ROOT / argv[0]
    else:
        module = argv[1] if argv[0] == "-m" else CONSOLE_SCRIPTS[argv[0]].split(":")[0]
        path = Path(importlib.util.find_spec(module).origin)
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("name", list(COMMAND_LINES))
def test_help_says_what_the_script_does_first_and_starts_nothing(name, nothing_started) -> None:
    argv = COMMAND_LINES[name]
    code, out, err = run_command_line([*argv, "--help"])
    assert code == 0, err[-2000:]
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith("usage: ") and len(usage.splitlines()) <= 4, usage
    assert words(description) == words(docstring(argv).split("\n\n")[0])
    assert len(out.splitlines()) <= MAX_LINES, f"{name} --help: {len(out.splitlines())} lines"


@pytest.mark.parametrize("name", list(CONFIG_DRIVEN))
def test_trainer_help_shows_the_recipe_form_and_keeps_every_option_reachable(name, nothing_started) -> None:
    code, short, err = run_command_line([name, "--help"])
    assert code == 0, err[-2000:]
    assert short.startswith(f"usage: {Path(name).name} --config RECIPE.yaml")
    assert f"--config training/recipes/tiny/{CONFIG_DRIVEN[name]}" in short
    assert "--help-all" in short and "--learning_rate" not in short  # inherited options: named, not listed
    code, everything, err = run_command_line([name, "--help-all"])
    assert code == 0, err[-2000:]
    assert {"--learning_rate", "--per_device_train_batch_size", "--output_dir", "--dataset_name"} <= set(
        everything.split()
    )
    assert len(everything.splitlines()) > 300


@pytest.mark.parametrize("name", list(CONFIG_DRIVEN))
def test_trainer_argument_errors_still_exit_2_with_one_line(name, nothing_started) -> None:
    recipe = ROOT / "training" / "recipes" / "tiny" / CONFIG_DRIVEN[name]
    code, out, err = run_command_line([name, "--config", str(recipe), "--colour", "red"])
    assert code == 2 and out == ""
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines() if "error" in line]
    assert "--colour" in err and "usage:" not in err
