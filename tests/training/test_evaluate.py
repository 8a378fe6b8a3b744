"""`training/evaluate.py` on a tiny saved model and real data: the five systems side by side (SEPIT, structure
withheld, LLM only, PureLLM from its own folder, retrieval from the train split), the held-out split and the
InstructProtein benchmark, report files and predictions, rescored by `training/score.py`; without a PureLLM folder the
three of the SEPIT model and retrieval; the paper's scoring protocol; retrieval off by flag or without a train split,
and asked for without one an error; bad arguments exit 2 with a one-line message."""

import json
import runpy
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dataset_card.external_benchmarks import main as build_external_benchmarks
from dataset_card.retrieval_baseline import RETRIEVAL
from modeling_sepit.evaluation_sepit import PURE_LLM, SEPIT_SYSTEMS, SYSTEMS
from modeling_sepit.pure_llm import prepare_pure_llm

ROOT = Path(__file__).resolve().parents[2]
evaluate = runpy.run_path(str(ROOT / "training" / "evaluate.py"))
score = runpy.run_path(str(ROOT / "training" / "score.py"))


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
        assert list(results) == [*SYSTEMS, RETRIEVAL]
        for scores in results.values():
            assert scores["overall"]["n"] == questions
            assert scores["settings"]["bertscore"]["num_layers"] == 6  # the bundled all-MiniLM-L6-v2
        assert (folder / "metrics.png").read_bytes().startswith(b"\x89PNG")
        table = (folder / "metrics.md").read_text()
        assert all(f"| {system} " in table for system in [*SYSTEMS, RETRIEVAL]) and table.split("\n")[0] in printed
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == questions and all({*SYSTEMS, RETRIEVAL} <= set(record) for record in predictions)
        neighbours = json.loads((folder / "retrieval.json").read_text())
        assert neighbours["summary"]["questions"] == len(neighbours["neighbours"]) == questions
        assert "## Retrieval neighbours" in table and "| median identity | at >= 50% identity |" in table
        # the same answers under the paper's protocol: retrieval is one more system to score.py
        rescored = tmp_path / f"sepit-{benchmark}"
        argv = [
            "--predictions",
            str(folder / "predictions.jsonl"),
            "--protocol",
            "sepit",
            "--output_dir",
            str(rescored),
        ]
        assert score["main"](argv) == 0
        assert list(json.loads((rescored / "metrics.json").read_text())) == [*SYSTEMS, RETRIEVAL]
        assert f"| {RETRIEVAL} " in (rescored / "metrics.md").read_text()
    closed = json.loads((output / "instructprotein" / "metrics.json").read_text())["sepit"]["overall"]["closed"]
    assert closed["n"] == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--systems", "sepit", "gpt"], "systems: ['gpt']; choose from"),
        (["--max_samples", "0"], "max_samples must be at least 1"),
        (["--retrieval_threshold", "0"], "retrieval_threshold must be an identity in (0, 1]"),
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
    assert list(results) == [*SEPIT_SYSTEMS, RETRIEVAL]
    assert results["sepit"]["settings"]["protocol"] == "corpus"  # the default


def test_the_papers_protocol_scores_and_says_so(saved_model, demo_dataset, tmp_path) -> None:
    output = tmp_path / "evaluation"
    argv = [
        "--model_name_or_path", str(saved_model), "--dataset_name", str(demo_dataset), "--output_dir", str(output),
        "--max_samples", "3", "--max_new_tokens", "2", "--systems", "sepit", "--protocol", "sepit",
    ]  # fmt: skip
    assert evaluate["main"](argv) == 0
    results = json.loads((output / "heldout" / "metrics.json").read_text())
    assert list(results) == ["sepit", RETRIEVAL] and results[RETRIEVAL]["settings"]["protocol"] == "sepit"
    settings = results["sepit"]["settings"]
    assert (settings["protocol"], settings["scale"], settings["bertscore"]["num_layers"]) == ("sepit", 100, 6)
    assert "Protocol `sepit` (the paper's evaluation script)" in (output / "heldout" / "metrics.md").read_text()


def test_a_folder_that_is_no_pure_llm_is_named(saved_model, tiny_parts, tmp_path, capsys) -> None:
    argv = ["--model_name_or_path", str(saved_model), "--output_dir", str(tmp_path / "out")]
    assert evaluate["main"]([*argv, "--pure_llm_model_name_or_path", str(tiny_parts / "language_model")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: error: ")]
    assert "pure_llm_model_name_or_path: " in line and "is not a PureLLM folder" in line


@pytest.fixture(scope="module")
def dataset_without_train(demo_dataset, tmp_path_factory) -> Path:
    """The demo dataset with its instructions' train split left out (as a build with no training rows would be)."""
    folder = tmp_path_factory.mktemp("no-train") / "dataset"
    shutil.copytree(demo_dataset, folder)
    for path in (folder / "instructions").glob("train-*.parquet"):
        path.unlink()
    _, header, body = (folder / "README.md").read_text().split("---\n", 2)
    card = yaml.safe_load(header)
    for config in card["configs"]:
        if config["config_name"] == "instructions":
            config["data_files"] = [files for files in config["data_files"] if files["split"] != "train"]
    for info in card["dataset_info"]:
        if info["config_name"] == "instructions":
            info["splits"] = [split for split in info["splits"] if split["name"] != "train"]
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n{body}")
    return folder


def test_retrieval_is_off_by_flag_or_without_a_train_split(saved_model, demo_dataset, dataset_without_train, tmp_path):
    common = ["--model_name_or_path", str(saved_model), "--max_samples", "2", "--max_new_tokens", "2"]
    common += ["--systems", "sepit", "--bertscore_model", "none"]
    for dataset, extra in ((demo_dataset, ["--retrieval", "false"]), (dataset_without_train, [])):
        output = tmp_path / dataset.parent.name
        assert evaluate["main"]([*common, "--dataset_name", str(dataset), "--output_dir", str(output), *extra]) == 0
        assert list(json.loads((output / "heldout" / "metrics.json").read_text())) == ["sepit"]
        assert not (output / "heldout" / "retrieval.json").exists()


def test_retrieval_asked_for_without_a_train_split_exits_2(saved_model, dataset_without_train, tmp_path, capsys):
    argv = ["--model_name_or_path", str(saved_model), "--dataset_name", str(dataset_without_train)]
    assert evaluate["main"]([*argv, "--output_dir", str(tmp_path / "out"), "--retrieval", "true"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: error: ")]
    assert line.startswith("evaluate: error: retrieval: ") and "has no train split" in line
    assert not (tmp_path / "out").exists()
