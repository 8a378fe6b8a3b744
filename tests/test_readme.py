"""The README's code, taken from README.md itself so that it cannot drift: every ```python block runs as written (in
a fresh namespace, in an empty working folder, on tiny parts in place of the real checkpoints it names), and every
command of the ```bash blocks names a script or console script (or a dependency's subcommand: `hf download`) whose
`--help` exits 0 and lists each flag the command passes, with the repository files it names present. A failure names
the README line of its block."""

import ast
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.hub_sepit import save_hub_folder
from tests.conftest import CONSOLE_SCRIPTS, ROOT, run_command_line

README = ROOT / "README.md"
# Names the snippets use that cannot be had here -> the tiny stand-in (a key of `stand_ins`).
STAND_INS = {
    "facebook/esm2_t33_650M_UR50D": "protein_model",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "language_model",
    "outputs/main/hub-model": "hub_model",  # what `./run.sh main` writes
    "me/sepit-tiny-lora": "hub_model",  # what a Hub fine-tuning job pushes (a folder of the same kind)
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Console scripts of dependencies that README commands run (`hf download`): `<program> <subcommand> --help`.
DEPENDENCY_COMMANDS = {"hf"}


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(README line of the block's first code line, code) of each fenced block in `language`."""
    blocks, start, lines = [], None, README.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if start is None and line.strip() == f"```{language}":
            start = number + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start - 1 : number - 1])))
            start = None
    return blocks


def commands(first_line: int, block: str) -> list[tuple[int, str]]:
    """(README line, command) of each command of a bash block: continuation lines joined, comment-only lines dropped."""
    found, start, parts = [], None, []
    for number, text in enumerate(block.splitlines(), start=first_line):
        start = number if start is None else start
        parts.append(text.removesuffix("\\"))
        if not text.endswith("\\"):
            command = " ".join(parts)
            if shlex.split(command, comments=True):
                found.append((start, command))
            start, parts = None, []
    return found


PYTHON_BLOCKS = code_blocks("python")
BASH_COMMANDS = [found for line, block in code_blocks("bash") for found in commands(line, block)]


@pytest.fixture(scope="module")
def stand_ins(tiny_parts, tmp_path_factory) -> dict[str, Path]:
    """Tiny parts, and a Hub-ready folder made from them as the main job makes its own."""
    parts = {name: tiny_parts / name for name in ("protein_model", "language_model")}
    model = SepitForConditionalGeneration.from_pretrained_parts(parts["protein_model"], parts["language_model"])
    processor = SepitProcessor.from_pretrained_parts(parts["protein_model"], parts["language_model"])
    hub_model = save_hub_folder(model, processor, tmp_path_factory.mktemp("readme") / "hub-model")
    return parts | {"hub_model": hub_model}


def string_literals(code: str) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_the_blocks_are_found() -> None:
    assert len(PYTHON_BLOCKS) >= 3 and len(BASH_COMMANDS) >= 10
    used = set().union(*(string_literals(code) for _, code in PYTHON_BLOCKS))
    assert not set(STAND_INS) - used, "STAND_INS names a checkpoint no snippet uses any more: remove it"


@pytest.mark.parametrize(("line", "code"), PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_snippet_runs(line, code, stand_ins, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for literal in string_literals(code):
        if literal in STAND_INS:
            stand_in = repr(str(stand_ins[STAND_INS[literal]]))
            for quote in "\"'":
                code = code.replace(f"{quote}{literal}{quote}", stand_in)
        elif (ROOT / literal).is_file():  # a repository file the snippet reads, at the same relative path
            (tmp_path / literal).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / literal, tmp_path / literal)
        else:
            unknown_checkpoint = HUB_ID.match(literal) and not (ROOT / literal).exists()
            assert not unknown_checkpoint, f"README.md:{line}: add a tiny stand-in for {literal!r} to STAND_INS"
    # Padded to its README line, so that a traceback points into README.md itself.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    try:
        exec(compiled, {"__name__": "__readme__"})
    except Exception as error:
        raise AssertionError(f"README.md:{line}: the python block fails: {type(error).__name__}: {error}") from error


def run_sh_commands() -> dict[str, list[str]]:
    """`./run.sh <mode>` -> the python arguments it runs (from run.sh's own `case`)."""
    cases = re.findall(r'^\s*(\w+)\) shift; exec "\$venv/bin/python" (.+?) "\$@"', (ROOT / "run.sh").read_text(), re.M)
    return {mode: shlex.split(arguments) for mode, arguments in cases}


def python_argv(tokens: list[str], line: int) -> list[str]:
    """What a README command runs, as `run_command_line` takes it (`-m module`, a script, or a console script)."""
    program, *rest = tokens
    if program == "./run.sh":
        return run_sh_commands()[rest[0]]
    if program in ("python", ".venv/bin/python"):
        return rest[:2] if rest[0] == "-m" else rest[:1]
    name = program.removeprefix(".venv/bin/")
    assert name in CONSOLE_SCRIPTS, f"README.md:{line}: {program} is no script, module or console script here"
    return [name]


def dependency_help(tokens: list[str], line: int) -> str:
    """The help of a dependency's subcommand (`hf download --help`), from the console script beside this Python."""
    program = Path(sys.executable).with_name(tokens[0])
    result = subprocess.run([program, tokens[1], "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"README.md:{line}: {shlex.join(tokens[:2])} --help exits {result.returncode}"
    return result.stdout


@pytest.mark.parametrize(
    ("line", "command"),
    BASH_COMMANDS,
    ids=[f"README.md:{line}" for line, _ in BASH_COMMANDS],
)
def test_bash_command_resolves_and_its_flags_exist(line, command, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tokens = [token.strip("[]") for token in shlex.split(command, comments=True)]
    if tokens[0] in DEPENDENCY_COMMANDS:
        text = dependency_help(tokens, line)
    else:
        argv = python_argv(tokens, line)
        if argv[0] == "-m" and not (ROOT / argv[1].replace(".", "/")).with_suffix(".py").is_file():
            pytest.importorskip(argv[1])  # another project's module (pytest): there to be run, not ours to document
            return
        code, text, err = run_command_line([*argv, "--help"])
        assert code == 0, f"README.md:{line}: {shlex.join(argv)} --help exits {code}: {err[-1500:]}"
        if "--help-all" in text:
            code, text, err = run_command_line([*argv, "--help-all"])
            assert code == 0, f"README.md:{line}: {shlex.join(argv)} --help-all exits {code}: {err[-1500:]}"
    for flag in (token for token in tokens if token.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"README.md:{line}: {flag} is no option"
    for path in re.findall(r"(?<![\w./-])([\w.-]+/[\w./-]+)", command):
        folder = ROOT / path.split("/")[0]
        if folder.is_dir() and any(folder.glob("*.py")):  # a path into the repository, not an output
            assert (ROOT / path).exists(), f"README.md:{line}: {path} does not exist"
