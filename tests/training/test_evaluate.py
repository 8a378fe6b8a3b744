"""`training/evaluate.py` on a tiny saved model and real data: the three systems side by side, the held-out split and
the InstructProtein benchmark, report files and predictions; bad arguments exit 2 with a one-line message."""

import json
import runpy
from pathlib import Path

import pytest

from dataset_card.external_benchmarks import main as build_external_benchmarks
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.evaluation_sepit import SYSTEMS

ROOT = Path(__file__).resolve().parents[2]
evaluate = runpy.run_path(str(ROOT / "training" / "evaluate.py"))


@pytest.fixture(scope="module")
def saved_model(tiny_parts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evaluate") / "model"
    processor = SepitProcessor.from_pretrained_parts(tiny_parts / "protein_model", tiny_parts / "language_model")
    processor.max_protein_length = 64
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model", protein_token_id=processor.protein_token_id
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_reports_every_system_on_both_benchmarks(saved_model, demo_dataset, tmp_path, capsys) -> None:
    external = tmp_path / "instructprotein"
    assert build_external_benchmarks(["--output_dir", str(external), "--max_per_benchmark", "4"]) == 0
    output = tmp_path / "evaluation"
    argv = [
        "--model_name_or_path", str(saved_model), "--dataset_name", str(demo_dataset), "--output_dir", str(output),
        "--external_benchmarks", str(external), "--max_samples", "8", "--max_new_tokens", "4",
    ]  # fmt: skip
    assert evaluate["main"](argv) == 0
    printed = capsys.readouterr().out
    for benchmark, questions in (("heldout", 8), ("instructprotein", 8)):
        folder = output / benchmark
        results = json.loads((folder / "metrics.json").read_text())
        assert list(results) == list(SYSTEMS)
        for scores in results.values():
            assert scores["overall"]["n"] == questions
            assert scores["settings"]["bertscore"]["num_layers"] == 6  # the bundled all-MiniLM-L6-v2
        assert (folder / "metrics.png").read_bytes().startswith(b"\x89PNG")
        table = (folder / "metrics.md").read_text()
        assert all(f"| {system} " in table for system in SYSTEMS) and table.split("\n")[0] in printed
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == questions and all(set(SYSTEMS) <= set(record) for record in predictions)
    closed = json.loads((output / "instructprotein" / "metrics.json").read_text())["sepit"]["overall"]["closed"]
    assert closed["n"] == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--systems", "sepit", "gpt"], "systems: ['gpt']; choose from"),
        (["--max_samples", "0"], "max_samples must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(saved_model, tmp_path, capsys, extra, message) -> None:
    argv = ["--model_name_or_path", str(saved_model), "--output_dir", str(tmp_path), *extra]
    assert evaluate["main"](argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
