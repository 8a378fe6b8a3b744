"""The main job end to end with every stage cut to two steps: dataset, stages 0 -> 1 -> 2, the PureLLM baseline,
evaluation with every baseline (retrieval included) under both scoring protocols, the Hub-ready folder with its model
card, the fresh-process reload answering held-out questions, and the push of model and dataset at the network
boundary."""

import json
import runpy
from pathlib import Path
from unittest import mock

import pytest

from dataset_card.retrieval_baseline import RETRIEVAL
from modeling_sepit.evaluation_sepit import PURE_LLM, SYSTEMS

ROOT = Path(__file__).resolve().parents[2]
main_job = runpy.run_path(str(ROOT / "examples" / "main_job.py"))
PROTEIN_GEOMETRIES = runpy.run_path(str(ROOT / "training" / "build_geometry_parts.py"))["PROTEIN_GEOMETRIES"]


def test_main_job_builds_trains_evaluates_publishes_and_reloads(tmp_path, capfd) -> None:
    output = tmp_path / "main"
    argv = [
        "--output_dir", str(output), "--max_steps", "2", "--external_per_benchmark", "4", "--max_eval_samples", "6",
        "--push_model_repo", "me/sepit-demo", "--push_dataset_repo", "me/sepit-data",
    ]  # fmt: skip
    with (
        mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", False),  # the Hub "reachable": pushes are not refused
        mock.patch("modeling_sepit.hub_sepit.HfApi") as model_api,
        mock.patch("dataset_card.card.HfApi") as dataset_api,
    ):
        model_api.return_value.upload_folder.return_value = "https://huggingface.co/me/sepit-demo/commit/1"
        dataset_api.return_value.upload_folder.return_value = "https://huggingface.co/datasets/me/sepit-data/commit/2"
        assert main_job["main"](argv) == 0
    printed = capfd.readouterr().out

    for stage in ("stage0", "stage1", "stage2", "pure-llm"):
        assert (output / stage / "loss_curve.png").stat().st_size > 1000
    header = "| metric | " + " | ".join([*SYSTEMS, RETRIEVAL]) + " |"  # SEPIT, its two baselines, PureLLM, retrieval
    # the same answers under both protocols, in the closing table and the model card
    assert printed.count(header) >= 2 and "Protocol `sepit` (the paper's" in printed
    for benchmark in ("heldout", "instructprotein"):
        scored = json.loads((output / "evaluation-sepit" / benchmark / "metrics.json").read_text())
        assert list(scored) == [*SYSTEMS, RETRIEVAL] and scored["sepit"]["settings"]["protocol"] == "sepit"
        assert f"Retrieval neighbours ({benchmark})" in printed
    card = (output / "hub-model" / "README.md").read_text()
    assert card.count("Protocol `corpus` (this project's") == 2 and card.count("Protocol `sepit` (the paper's") == 2
    assert "## Evaluation" in card and "| yes/no accuracy |" in card and "| split | proteins |" in card
    assert f"| {PURE_LLM} |" in card and "PureLLM (the paper's baseline" in card
    assert f"| {RETRIEVAL} |" in card and card.count("| median identity | at >= 50% identity |") == 2
    assert (output / "hub-model" / "model.safetensors").is_file() and (output / "dataset" / "README.md").is_file()
    # The fresh process loaded the class from the folder's own code and answered all three requests.
    assert "(transformers_modules." in printed and printed.count("  answer:    ") == 3
    assert "[4hhb.pdb] What is the function of this protein?" in printed
    model_upload = model_api.return_value.upload_folder.call_args.kwargs
    assert model_upload["folder_path"] == str(output / "hub-model") and model_upload["repo_id"] == "me/sepit-demo"
    dataset_upload = dataset_api.return_value.upload_folder.call_args.kwargs
    assert dataset_upload["folder_path"] == str(output / "dataset") and dataset_upload["repo_type"] == "dataset"
    assert "model pushed: https://huggingface.co/me/sepit-demo/commit/1" in printed


def test_preset_smollm2_trains_smollm2_with_its_recipes(tmp_path, monkeypatch, capsys) -> None:
    """The preset's commands, recorded up to stage 1 instead of run (the full run takes hours here: README)."""
    commands = []

    def record(step: str, command: list[str]) -> float:
        commands.append(command)
        if step.startswith("5/9"):
            raise main_job["StepFailed"]("stage 1 recorded")
        return 0.0

    monkeypatch.setitem(main_job["run_steps"].__globals__, "run", record)
    output = tmp_path / "main"
    assert main_job["main"](["--preset", "smollm2", "--output_dir", str(output)]) == 2
    assert capsys.readouterr().err.strip() == "main_job: error: stage 1 recorded"
    _, _, parts, smollm2, stage0, stage1 = commands  # dataset, InstructProtein sets, parts, SmolLM2, stages 0 and 1
    assert parts[1] == "training/build_tiny_parts.py"
    geometry = dict(zip(parts[2::2], parts[3::2], strict=True))  # ESM-2 8M's (build_geometry_parts' esm2_8m)
    assert [int(geometry[f"--protein_{name}"]) for name in ("layers", "hidden_size", "heads", "intermediate_size")] == [
        *PROTEIN_GEOMETRIES["esm2_8m"]
    ]
    assert smollm2[1:] == ["training/build_smollm2.py", "--output_dir", str(output / "smollm2")]
    recipes = ROOT / "training" / "recipes" / "smollm2"
    assert stage0[stage0.index("--config") + 1] == str(recipes / "stage0.yaml")
    assert stage1[stage1.index("--config") + 1] == str(recipes / "stage1.yaml")
    assert stage1[stage1.index("--language_model_name_or_path") + 1] == str(output / "smollm2")
    assert stage1[stage1.index("--protein_model_name_or_path") + 1] == str(output / "parts" / "protein_model")
    assert stage1[stage1.index("--chat_template_path") + 1] == str(output / "smollm2")  # SmolLM2's own ChatML


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protein_model", "facebook/esm2_t6_8M_UR50D"], "give all three real checkpoints"),
        (["--recipes", "training"], "has no stage0.yaml"),
        (["--preset", "tinyllama"], "preset: 'tinyllama' is not one; the preset is smollm2"),
        (["--preset", "smollm2", "--protein_model", "a", "--language_model", "b", "--text_encoder", "c"], "leave out"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys) -> None:
    assert main_job["main"](argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
