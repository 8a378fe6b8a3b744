"""Hub-hosted fine-tuning: `examples/hub_finetune.py` (the uv script a Hugging Face Job runs) and
`training/submit_hub_job.py` (which sends it). The script's inline metadata parses with PEP 723's reference regex and
pins what setup.cfg / constraints.txt pin; the script runs end to end in a fresh process where this project cannot be
imported, on tiny parts pushed to a Hub on disk (`fake_hub`, in place of `HfApi`'s network methods), and uploads the
adapter, a merged model that `pipeline("protein-qa", trust_remote_code=True)` loads, and the model card; a run
killed right after a checkpoint reached the Hub resumes from it to the weights of an uninterrupted run; the submit
command builds the `run_uv_job` call and refuses offline mode, a missing token or an unknown flavor with one line."""

import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, JobHardware
from huggingface_hub.errors import RepositoryNotFoundError
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from safetensors.torch import load_file

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.hub_sepit import save_hub_folder
from tests.conftest import ROOT, run_command_line, run_in_fresh_python
from tests.examples.fake_hub import not_found

SCRIPT = ROOT / "examples" / "hub_finetune.py"
FAKE_HUB = Path(__file__).with_name("fake_hub.py")
# PEP 723's reference implementation (https://peps.python.org/pep-0723/#reference-implementation).
PEP_723 = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")
BASE, DATA = "me/sepit-base", "me/sepit-data"
# Four steps of four rows, a checkpoint pushed every two.
RUN = [
    "--model", BASE, "--dataset", DATA, "--max_steps", "4", "--save_steps", "2", "--max_train_samples", "16",
    "--max_eval_samples", "8", "--max_protein_length", "32", "--lora_dropout", "0", "--logging_steps", "1",
    "--activation_checkpointing", "false",
]  # fmt: skip
# The fresh process: this project not importable, the Hub on disk, then the script as `python hub_finetune.py ...`.
RUNNER = f"""
import runpy, sys
sys.modules.update(modeling_sepit=None, dataset_card=None, training=None)
sys.path.insert(0, {str(FAKE_HUB.parent)!r})
import fake_hub
fake_hub.install(sys.argv[1])
sys.argv = [{str(SCRIPT)!r}, *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
LOAD_AND_ASK = """
import json, sys
sys.modules["modeling_sepit"] = None  # only the pushed folder's own code may run
import torch
from peft import PeftModel
from transformers import AutoModel, pipeline

base, pushed = sys.argv[1:3]
qa = pipeline("protein-qa", model=pushed, trust_remote_code=True)
answer = qa({"question": "What is the function of <protein> ?", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"},
            max_new_tokens=4)[0]["answer"]
inputs = qa.processor.apply_chat_template(
    [{"role": "user", "content": "Where is <protein> located ?"}], proteins=["MKTAYIAKQRQISF"],
    add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), pushed + "/adapter")
with torch.no_grad():
    gap = (qa.model(**inputs).logits - adapted(**inputs).logits).abs().max().item()
print(json.dumps({"pipeline": type(qa).__module__, "answer": answer, "gap": gap}))
"""


def script_metadata() -> dict:
    blocks = [match for match in PEP_723.finditer(SCRIPT.read_text(encoding="utf-8")) if match["type"] == "script"]
    assert len(blocks) == 1, "exactly one `# /// script` block"
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:] for line in blocks[0]["content"].splitlines(keepends=True)
    )
    return tomllib.loads(content)


def test_inline_metadata_parses_and_pins_what_the_project_pins() -> None:
    metadata = script_metadata()
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = [
        Requirement(line)
        for line in (setup["options"]["install_requires"] + setup["options.extras_require"]["train"]).splitlines()
        if line.strip()
    ]
    declared = {requirement.name: requirement for requirement in declared}
    pins = {
        requirement.name: requirement
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
        for requirement in [Requirement(line)]
    }
    assert metadata["requires-python"] == setup["options"]["python_requires"]
    script = {requirement.name: requirement for requirement in map(Requirement, metadata["dependencies"])}
    for name, requirement in script.items():
        assert name in declared, f"{name}: not a dependency of this project (setup.cfg)"
        expected = pins.get(name, declared[name]).specifier
        assert requirement.specifier == expected, f"{name}{requirement.specifier}: setup.cfg/constraints say {expected}"
    needed = {Requirement(line).name for line in setup["options"]["install_requires"].splitlines() if line.strip()}
    needed |= {"accelerate", "datasets", "peft", "trl"}  # the train extra, less what only plots or builds datasets
    assert needed <= set(script), f"missing from the script's dependencies: {needed - set(script)}"
    # Every module the script imports is the standard library's or a declared dependency's, never this project's.
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(SCRIPT.read_text(encoding="utf-8")))
        if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0
        for alias in node.names
    }
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    providers = packages_distributions()
    assert {canonicalize_name(providers[module][0]) for module in third_party} <= set(script)
    launch = metadata["tool"]["hf-jobs"]  # what `hf jobs uv run` reads; submit_hub_job.py reads it too
    assert launch["secrets"] == ["HF_TOKEN"] and launch["flavor"] in {hardware.value for hardware in JobHardware}


@pytest.fixture(scope="module")
def hub(tiny_parts, demo_dataset, tmp_path_factory) -> Path:
    """A Hub on disk holding a SEPIT model as `save_hub_folder` writes it and the builder's dataset."""
    root = tmp_path_factory.mktemp("hub")
    parts = {name: str(tiny_parts / name) for name in ("protein_model", "language_model")}
    torch.manual_seed(0)
    processor = SepitProcessor.from_pretrained_parts(parts["protein_model"], parts["language_model"])
    model = SepitForConditionalGeneration.from_pretrained_parts(
        parts["protein_model"], parts["language_model"], protein_token_id=processor.protein_token_id
    )
    folder = save_hub_folder(model, processor, root / "saved")
    shutil.copytree(folder, root / "model" / BASE / "main", ignore=shutil.ignore_patterns(".sepit-output"))
    shutil.copytree(demo_dataset, root / "dataset" / DATA / "main", ignore=shutil.ignore_patterns(".sepit-output"))
    return root


def run_script(hub: Path, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The script in a fresh interpreter (as run_in_fresh_python, which also expects success): exit code and output."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runner.py").write_text(RUNNER)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "runner.py", str(hub), *argv],
        cwd=workdir,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout, result.stderr


def calls(hub: Path, repo_id: str) -> list[dict]:
    log = (hub / "calls.jsonl").read_text(encoding="utf-8").splitlines()
    return [call for call in map(json.loads, log) if call["repo_id"] == repo_id]


@pytest.fixture(scope="module")
def finetuned(hub, tmp_path_factory) -> dict:
    """One uninterrupted LoRA run, pushed to me/sepit-ft; its wall time is printed (the issue's closing note)."""
    start = time.perf_counter()
    code, out, err = run_script(hub, [*RUN, "--output_repo", "me/sepit-ft"], tmp_path_factory.mktemp("job"))
    print(f"\nhub_finetune.py end to end (fresh process, tiny parts): {time.perf_counter() - start:.1f} s")
    assert code == 0, err[-3000:]
    return {"out": out, "repo": hub / "model" / "me/sepit-ft"}


def test_the_script_fine_tunes_from_the_hub_and_pushes_adapter_merged_model_and_card(hub, finetuned, tmp_path):
    pushed = finetuned["repo"] / "main"
    # Downloads, then the output repo and its checkpoint branch, checkpoints as they are saved, the result, clean-up.
    assert [(call["method"], call["repo_id"]) for call in calls(hub, BASE)] == [("snapshot_download", BASE)]
    card, data = calls(hub, DATA)  # the card, then the files of the config it names (not the captions)
    assert card["allow"] == "README.md" and "instructions/train-*.parquet" in data["allow"]
    assert data["repo_type"] == "dataset" and "captions" not in data["allow"]
    made = calls(hub, "me/sepit-ft")
    checkpoints = [call for call in made if call.get("path_in_repo") == "last-checkpoint"]
    assert len(checkpoints) == 2 and all(call["revision"] == "training-checkpoints" for call in checkpoints)
    final = [call for call in made if call["method"] == "upload_folder" and call["revision"] == "None"]
    assert len(final) == 1 and made[-1]["method"] == "delete_branch"
    assert not (finetuned["repo"] / "training-checkpoints").exists()  # a finished run leaves nothing to resume

    adapter = json.loads((pushed / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BASE and adapter["modules_to_save"] == ["multi_modal_projector"]
    assert (pushed / "adapter" / "adapter_model.safetensors").is_file()
    assert not (pushed / "adapter_config.json").exists()  # the root is the merged model, not an adapter
    config = json.loads((pushed / "config.json").read_text())
    assert "protein-qa" in config["custom_pipelines"] and (pushed / "pipeline_protein_qa.py").is_file()
    card = (pushed / "README.md").read_text()
    assert "base_model:\n- me/sepit-base" in card and "datasets:\n- me/sepit-data" in card
    assert re.search(r"\| eval_loss \| \d+\.\d{4} \|", card) and "| steps | 4 |" in card
    assert f"hub_finetune.py {' '.join(RUN[:4])}" in card and "--output_repo me/sepit-ft" in card
    assert re.search(r"metrics: eval_loss [\d.]+, eval_mean_token_accuracy [\d.]+, train_loss [\d.]+", finetuned["out"])

    base, merged = (load_file(folder / "model.safetensors") for folder in (hub / "model" / BASE / "main", pushed))
    changed = {name.removeprefix("model.").split(".")[0] for name in base if not torch.equal(base[name], merged[name])}
    assert changed == {"language_model", "multi_modal_projector"}  # adapters merged, projector trained, rest frozen
    checked = json.loads(
        run_in_fresh_python(LOAD_AND_ASK, [str(hub / "model" / BASE / "main"), str(pushed)], tmp_path).splitlines()[-1]
    )
    assert checked["pipeline"].startswith("transformers_modules.") and isinstance(checked["answer"], str)
    assert checked["gap"] < 1e-4  # the merged model computes what base + the pushed adapter compute


def test_a_job_killed_after_a_checkpoint_reached_the_hub_resumes_from_it(hub, finetuned, tmp_path) -> None:
    argv = [*RUN, "--output_repo", "me/sepit-resumed"]
    code, _, err = run_script(hub, argv, tmp_path / "first", env={"FAKE_HUB_KILL_AT_STEP": "2"})
    assert code == -9, err[-3000:]  # preempted: SIGKILL right after the step-2 checkpoint was pushed
    repo = hub / "model" / "me/sepit-resumed"
    state = json.loads((repo / "training-checkpoints" / "last-checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not (repo / "main" / "model.safetensors").exists()

    code, out, err = run_script(hub, argv, tmp_path / "second")  # a new container: nothing on its disk
    assert code == 0, err[-3000:]
    assert "resuming from me/sepit-resumed@training-checkpoints/last-checkpoint (step 2)" in out
    assert "| resumed from step | 2 |" in (repo / "main" / "README.md").read_text()
    resumed = load_file(repo / "main" / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(finetuned["repo"] / "main" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_full_fine_tuning_pushes_the_model_without_an_adapter(hub, tmp_path) -> None:
    argv = [*RUN, "--output_repo", "me/sepit-full", "--method", "full", "--max_steps", "2"]
    argv += ["--dataset_config", "captions"]
    code, _, err = run_script(hub, argv, tmp_path)
    assert code == 0, err[-3000:]
    pushed = hub / "model" / "me/sepit-full" / "main"
    assert not (pushed / "adapter").exists() and "| method | full |" in (pushed / "README.md").read_text()
    base, trained = (load_file(folder / "model.safetensors") for folder in (hub / "model" / BASE / "main", pushed))
    changed = {name.removeprefix("model.").split(".")[0] for name in base if not torch.equal(base[name], trained[name])}
    assert {"protein_model", "multi_modal_projector", "language_model", "lm_head"} <= changed  # every part trains


def test_an_moe_model_gets_adapters_on_every_expert_and_its_balancing_loss(hub, tiny_parts, tmp_path) -> None:
    """The main job pushes a stage-2 model: 4 experts, top-1 (README: Fine-tune on the Hub)."""
    parts = {name: str(tiny_parts / name) for name in ("protein_model", "language_model")}
    processor = SepitProcessor.from_pretrained_parts(parts["protein_model"], parts["language_model"])
    model = SepitForConditionalGeneration.from_pretrained_parts(
        parts["protein_model"], parts["language_model"], protein_token_id=processor.protein_token_id
    )
    model.upcycle_to_moe(num_experts=4, num_experts_per_tok=1)
    save_hub_folder(model, processor, hub / "model" / "me/sepit-moe" / "main")
    argv = [*RUN, "--model", "me/sepit-moe", "--output_repo", "me/sepit-moe-lora", "--max_steps", "2"]
    code, out, err = run_script(hub, argv, tmp_path)
    assert code == 0, err[-3000:]
    assert "'aux_loss'" in out  # TRL's load-balancing loss, with the coefficient the model's config carries
    adapter = load_file(hub / "model" / "me/sepit-moe-lora" / "main" / "adapter" / "adapter_model.safetensors")
    experts = {re.search(r"experts\.(\d+)\.", name)[1] for name in adapter if "experts" in name}
    assert experts == {"0", "1", "2", "3"}


@pytest.mark.parametrize(
    ("argv", "offline", "message"),
    [
        (["--output_repo", "me/x"], True, "HF_HUB_OFFLINE=1: the result and the checkpoints are pushed to the Hub"),
        (["--output_repo", BASE], False, "the result would replace its base"),
        (["--output_repo", "me/x", "--hub_strategy", "end"], False, "--hub_strategy is set by this script"),
        (["--output_repo", "me/x", "--colour", "red"], False, "unrecognized arguments: --colour red"),
        (["--output_repo", "me/x", "--lora_r", "0"], False, "--lora_r must be >= 1"),
    ],
    ids=["offline", "output-is-the-base", "managed-option", "unknown-option", "bad-rank"],
)
def test_script_argument_errors_are_one_line(argv, offline, message, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with (
        mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", offline),
        mock.patch.object(HfApi, "snapshot_download") as download,
    ):
        code, out, err = run_command_line(["examples/hub_finetune.py", *RUN[:4], *argv])
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert not download.called


def test_script_a_repo_the_hub_does_not_have_is_one_line_and_creates_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    missing = not_found(RepositoryNotFoundError, "404 Client Error: Repository Not Found for url: .../me/sepit-base")
    with (
        mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", False),
        mock.patch.object(HfApi, "snapshot_download", side_effect=missing),
        mock.patch.object(HfApi, "create_repo") as create_repo,
    ):
        code, out, err = run_command_line(["examples/hub_finetune.py", *RUN[:4], "--output_repo", "me/x"])
    assert code == 2 and "Repository Not Found" in err and len(err.strip().splitlines()) == 1, err
    assert not create_repo.called


SUBMIT = ["training/submit_hub_job.py", "--model", BASE, "--dataset", DATA, "--output_repo", "me/sepit-ft"]


@pytest.fixture
def jobs_api(monkeypatch):
    """A logged-in user with the Hub reachable; `HfApi.run_uv_job` and `repo_exists` recorded, never sent."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    job = SimpleNamespace(id="6123abcd", url="https://huggingface.co/jobs/me/6123abcd")
    with (
        mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", False),
        mock.patch.object(HfApi, "run_uv_job", autospec=True, return_value=job) as run_uv_job,
        mock.patch.object(HfApi, "repo_exists", autospec=True, return_value=True) as repo_exists,
    ):
        yield SimpleNamespace(run_uv_job=run_uv_job, repo_exists=repo_exists)


def test_submit_sends_the_script_with_flavor_timeout_and_the_token_as_a_secret(jobs_api) -> None:
    code, out, err = run_command_line([*SUBMIT, "--flavor", "a100-large", "--timeout", "90m", "--", "--method", "full"])
    assert code == 0, err
    (api, script), sent = jobs_api.run_uv_job.call_args
    assert script == str(SCRIPT) and sent["flavor"] == "a100-large" and sent["timeout"] == "90m"
    assert sent["script_args"] == [
        "--model", BASE, "--dataset", DATA, "--output_repo", "me/sepit-ft", "--method", "full"
    ]  # fmt: skip
    assert sent["secrets"] == {"HF_TOKEN": "hf_secret"} and sent["attempts"] == 2 and not sent["env"]
    assert "hf_secret" not in json.dumps(sent["script_args"])
    checked = [(call.args[1], call.kwargs["repo_type"]) for call in jobs_api.repo_exists.call_args_list]
    assert checked == [(BASE, "model"), (DATA, "dataset")]
    assert "job id:  6123abcd" in out and "https://huggingface.co/jobs/me/6123abcd" in out


def test_submit_defaults_come_from_the_scripts_hf_jobs_table(jobs_api) -> None:
    code, _, err = run_command_line(SUBMIT)
    assert code == 0, err
    launch = script_metadata()["tool"]["hf-jobs"]
    sent = jobs_api.run_uv_job.call_args.kwargs
    assert (sent["flavor"], sent["timeout"]) == (launch["flavor"], launch["timeout"])


@pytest.mark.parametrize(
    ("argv", "patch", "message"),
    [
        (SUBMIT, ("huggingface_hub.constants.HF_HUB_OFFLINE", True), "HF_HUB_OFFLINE=1"),
        (SUBMIT, ("huggingface_hub.get_token", mock.Mock(return_value=None)), "no Hugging Face token"),
        ([*SUBMIT, "--flavor", "a10g-tiny"], None, "'a10g-tiny' is not a Jobs flavor"),
        ([*SUBMIT, "--timeout", "two hours"], None, "--timeout 'two hours'"),
        ([*SUBMIT[:2], "./sepit-folder", *SUBMIT[3:]], None, "push a local folder first"),
        ([*SUBMIT, "--tracker", "wandb"], None, "needs WANDB_API_KEY"),
    ],
    ids=["offline", "no-token", "unknown-flavor", "bad-timeout", "local-folder", "tracker-without-key"],
)
def test_submit_refuses_with_one_line_before_sending_anything(argv, patch, message, jobs_api, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with mock.patch(*patch) if patch else mock.patch.dict(os.environ):
        code, out, err = run_command_line(argv)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert not jobs_api.run_uv_job.called and not jobs_api.repo_exists.called


def test_submit_refuses_a_model_that_is_not_on_the_hub(jobs_api) -> None:
    jobs_api.repo_exists.return_value = False
    code, _, err = run_command_line(SUBMIT)
    assert code == 2 and "--model me/sepit-base: no such model repo" in err and not jobs_api.run_uv_job.called
