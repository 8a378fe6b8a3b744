"""`training/evaluate.py` on a tiny saved model and real data: the four systems side by side (SEPIT, structure
withheld, LLM only, PureLLM from its own folder), the held-out split and the InstructProtein benchmark, report files
and predictions; without a PureLLM folder the three of the SEPIT model; the paper's scoring protocol; bad arguments
exit 2 with a one-line message."""

import json
import runpy
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dataset_card.external_benchmarks import main as build_external_benchmarks
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.evaluation_sepit import PURE_LLM, SEPIT_SYSTEMS, SYSTEMS
from modeling_sepit.pure_llm import prepare_pure_llm

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


@pytest.fixture(scope="module")
def saved_pure_llm(saved_model, tiny_parts) -> Path:
    """The tiny LLM as a PureLLM folder (what training/pure_llm.py writes, untrained)."""
    folder = saved_model.parent / "pure-llm"
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts / "language_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_parts / "language_model")
    prepare_pure_llm(model, tokenizer, max_protein_length=64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reports_every_system_on_both_benchmarks(saved_model, saved_pure_llm, demo_dataset, tmp_path, capsys) -> None:
    external = tmp_path / "instructprotein"
    assert build_external_benchmarks(["--output_dir", str(external), "--max_per_benchmark", "4"]) == 0
    output = tmp_path / "evaluation"
    argv = [
        "--model_name_or_path", str(saved_model), "--dataset_name", str(demo_dataset), "--output_dir", str(output),
        "--external_benchmarks", str(external), "--max_samples", "8", "--max_new_tokens", "4",
        "--pure_llm_model_name_or_path", str(saved_pure_llm),
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
        (["--systems", "sepit", PURE_LLM], "pure_llm_model_name_or_path: the 'purellm, sequence as text' system and"),
        (["--pure_llm_model_name_or_path", "/no/such/pure-llm"], "pure_llm_model_name_or_path: /no/such/pure-llm is"),
        (["--protocol", "paper"], "protocol: 'paper'; choose from ['corpus', 'sepit']"),
        (["--protocol", "sepit", "--bertscore_model", "none"], "bertscore_model: the sepit protocol takes BLEU"),
        (["--protocol", "sepit", "--bertscore_num_layers", "6"], "bertscore_num_layers: the sepit protocol reads"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(saved_model, tmp_path, capsys, extra, message) -> None:
    argv = ["--model_name_or_path", str(saved_model), "--output_dir", str(tmp_path), *extra]
    assert evaluate["main"](argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_without_a_pure_llm_folder_the_sepit_models_three_systems(saved_model, demo_dataset, tmp_path) -> None:
    output = tmp_path / "evaluation"
    argv = [
        "--model_name_or_path", str(saved_model), "--dataset_name", str(demo_dataset), "--output_dir", str(output),
        "--max_samples", "2", "--max_new_tokens", "2", "--bertscore_model", "none",
    ]  # fmt: skip
    assert evaluate["main"](argv) == 0
    results = json.loads((output / "heldout" / "metrics.json").read_text())
    assert list(results) == list(SEPIT_SYSTEMS)
    assert results["sepit"]["settings"]["protocol"] == "corpus"  # the default


def test_the_papers_protocol_scores_and_says_so(saved_model, demo_dataset, tmp_path) -> None:
    output = tmp_path / "evaluation"
    argv = [
        "--model_name_or_path", str(saved_model), "--dataset_name", str(demo_dataset), "--output_dir", str(output),
        "--max_samples", "3", "--max_new_tokens", "2", "--systems", "sepit", "--protocol", "sepit",
    ]  # fmt: skip
    assert evaluate["main"](argv) == 0
    settings = json.loads((output / "heldout" / "metrics.json").read_text())["sepit"]["settings"]
    assert (settings["protocol"], settings["scale"], settings["bertscore"]["num_layers"]) == ("sepit", 100, 6)
    assert "Protocol `sepit` (the paper's evaluation script)" in (output / "heldout" / "metrics.md").read_text()


def test_a_folder_that_is_no_pure_llm_is_named(saved_model, tiny_parts, tmp_path, capsys) -> None:
    argv = ["--model_name_or_path", str(saved_model), "--output_dir", str(tmp_path / "out")]
    assert evaluate["main"]([*argv, "--pure_llm_model_name_or_path", str(tiny_parts / "language_model")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: error: ")]
    assert "pure_llm_model_name_or_path: " in line and "is not a PureLLM folder" in line
