"""The README's "Reproduce the paper" recipe, run as written on the bundled fixtures: its commands are taken from the
README section itself (so the two cannot drift), each `hf download` replaced by a copy of the fixture in the release's
layout, and each command given the few flags that fit it to the fixtures and this machine (appended, so they win):
the converted `original-tiny-moe-top1` checkpoint answers a few questions of each imported `sepit-data` test split,
and `training/score.py --protocol sepit` reports every metric for each split."""

import json
import shlex
import shutil
from pathlib import Path

from modeling_sepit.metrics_sepit import default_bertscore_model
from tests.conftest import ROOT, run_command_line
from tests.test_readme import README, code_blocks, commands, python_argv

SECTION = "## Reproduce the paper"
FIXTURES = ROOT / "tests" / "fixtures"
# What each download of the section fetches -> the fixture in the same layout, and the repo type it is.
DOWNLOADS = {
    "U-rara/SEPIT": (FIXTURES / "sepit-original" / "original-tiny-moe-top1", "model"),
    "U-rara/SEPIT-Data": (FIXTURES / "sepit-data" / "database", "dataset"),
}
QUESTIONS = 4  # per test split
# Flags appended to a command of the section: the fixtures' protein padding, CPU, and a short run.
FIXTURE_FLAGS = {
    "sepit-convert-original": ["--protein_padding_length", "48"],
    "training/generate.py": [
        "--device", "cpu", "--dtype", "float32", "--max_samples", str(QUESTIONS), "--max_new_tokens", "8",
        "--batch_size", str(QUESTIONS),
    ],
    "training/score.py": ["--bertscore_model", default_bertscore_model()],
}  # fmt: skip
OPEN_METRICS = [
    "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor",
    "bertscore_precision", "bertscore_recall", "bertscore_f1",
]  # fmt: skip


def section_commands() -> list[tuple[int, list[str]]]:
    """(README line, tokens) of each command in the bash blocks of the section."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(SECTION) + 1
    end = next((number for number in range(start, len(lines)) if lines[number].startswith("## ")), len(lines))
    return [
        (line, shlex.split(command, comments=True))
        for first, block in code_blocks("bash")
        if start < first <= end
        for line, command in commands(first, block)
    ]


def download(tokens: list[str], line: int, folder: Path) -> str:
    """Stand in for `hf download REPO [--repo-type TYPE] --local-dir DIR`: the repo's fixture copied to DIR."""
    assert tokens[:2] == ["hf", "download"], f"README.md:{line}: {shlex.join(tokens)} is no hf download"
    repo = tokens[2]
    assert repo in DOWNLOADS, f"README.md:{line}: no fixture stands in for {repo}"
    fixture, repo_type = DOWNLOADS[repo]
    options = dict(zip(tokens[3::2], tokens[4::2], strict=True))
    assert options.get("--repo-type", "model") == repo_type, f"README.md:{line}: {repo} is a {repo_type} repo"
    shutil.copytree(fixture, folder / options["--local-dir"])
    return repo


def test_the_readme_recipe_reproduces_the_paper_table_on_the_fixtures(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    downloaded, generated, table = set(), [], ""
    for line, tokens in section_commands():
        if tokens[0] == "hf":
            downloaded.add(download(tokens, line, tmp_path))
            continue
        argv = python_argv(tokens, line)
        arguments = tokens[len(argv) + 1 :] if tokens[0].endswith("python") else tokens[1:]
        code, out, err = run_command_line([*argv, *arguments, *FIXTURE_FLAGS.get(argv[-1], [])])
        assert code == 0, f"README.md:{line}: {shlex.join(tokens)} exits {code}: {err[-2000:]}"
        if argv[-1] == "training/generate.py":
            generated.append(arguments[arguments.index("--split") + 1])
        if argv[-1] == "training/score.py":
            table = out
    assert downloaded == set(DOWNLOADS)
    imported = {path.name.split("-")[0] for path in (tmp_path / "sepit-data" / "instructions").glob("*.parquet")}
    assert sorted(generated) == sorted(split for split in imported if "test" in split) == ["qa_test", "yn_test"]
    print(table)  # the table the recipe ends with (pytest -s shows it)

    scores = tmp_path / "outputs" / "reproduce" / "scores"
    (system,) = json.loads((scores / "metrics.json").read_text()).values()
    assert system["settings"]["protocol"] == "sepit" and system["overall"]["n"] == 2 * QUESTIONS
    open_ended, yes_no = system["per_type"]["qa_test_output"], system["per_type"]["yes_no:yn_test_output"]
    assert open_ended["open"]["n"] == QUESTIONS and open_ended["closed"]["n"] == 0
    assert all(0 <= open_ended["open"][metric] <= 100 for metric in OPEN_METRICS)
    assert yes_no["closed"]["n"] == QUESTIONS and yes_no["open"]["n"] == 0
    assert 0 <= yes_no["closed"]["accuracy"] <= 100
    for row in ("| BLEU-4 |", "| ROUGE-L |", "| METEOR |", "| BERTScore F1 |", "| yes/no accuracy |"):
        assert row in table
    assert "| qa_test_output | BERTScore F1 |" in table and "| yes_no:yn_test_output | yes/no accuracy |" in table
