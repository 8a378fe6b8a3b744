"""Offline use and safe loading (issue 8).

Offline: with `HF_HUB_OFFLINE=1`, a command that names a Hub model which is neither a local folder nor in the local
Hugging Face cache stops right after parsing (exit code 2, one line naming the argument, the repository and how to
provide it: `modeling_sepit.hub_sepit.require_local_or_cached`), before it builds anything; a loaded pipeline on a
saved folder opens no network connection. The whole workflow (build, train, evaluate, save, reload, pipeline) runs
with `HF_HUB_OFFLINE=1` in tests/examples/test_main_job.py.

Loading never executes code from data: a pickled `pytorch_model.bin` is read by transformers' `weights_only` path (a
payload in it never runs), every `torch.load` of the project passes `weights_only=True` and no module imports a
pickle reader, and a saved folder's remote code only runs behind `trust_remote_code=True`.
"""

import ast
import json
import os
import pickle
import runpy
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModel, AutoProcessor, pipeline

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.convert_original_sepit import convert
from modeling_sepit.hub_sepit import require_local_or_cached, save_hub_folder
from tests.conftest import ORIGINAL, ROOT, SCRIPTS, run_in_fresh_python, tiny_config

ESM, LLAMA = "facebook/esm2_t6_8M_UR50D", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"
SEPIT = "someone/sepit-model"
HOW = "download it on a machine with internet (`hf download {repo}`) and copy the cache, or pass a local folder"


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """`HF_HUB_OFFLINE=1` (read by huggingface_hub and transformers at each call) and an empty Hub cache."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """A Hub-ready folder (weights, processor, remote code) of the converted dense fixture."""
    root = tmp_path_factory.mktemp("offline")
    convert(ORIGINAL / "original-tiny-dense", root / "converted", protein_padding_length=48)
    model = SepitForConditionalGeneration.from_pretrained(root / "converted")
    return save_hub_folder(model, AutoProcessor.from_pretrained(root / "converted"), root / "hub")


# --- a missing Hub file fails at once --------------------------------------------------------------------------------


def test_helper_passes_local_folders_cached_repos_and_online_names(offline, tmp_path, monkeypatch):
    assert require_local_or_cached(None, "x") is None
    assert require_local_or_cached("", "encoder_warmup_dir") == ""  # an empty flag: not given
    assert require_local_or_cached(tmp_path, "x") == str(tmp_path)
    snapshot = offline / "models--someone--cached-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (offline / "models--someone--cached-model" / "refs").mkdir()
    (offline / "models--someone--cached-model" / "refs" / "main").write_text("a" * 40)
    assert require_local_or_cached("someone/cached-model", "x") == "someone/cached-model"
    with pytest.raises(ValueError, match="x: /no/such/folder is not a local folder"):
        require_local_or_cached("/no/such/folder", "x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert require_local_or_cached(SEPIT, "x") == SEPIT  # online: left to the Hub


# What each would start after a check that let the name through: replaced so that the test fails at once instead.
LONG_STEPS = {
    "evaluate": "SepitProcessor",
    "main_job": "run",
    "sft": "load_model_and_processor",
    "stage0": "build_trainer",
    "lora": "SepitProcessor",
    "pure_llm": "AutoTokenizer",
}
TRAIN = ["--output_dir", "{out}", "--use_cpu", "true", "--report_to", "none"]
OFFLINE_CASES = [
    pytest.param(
        "sft",
        ["--dataset_name", "{tmp}", "--protein_model_name_or_path", ESM, "--language_model_name_or_path", LLAMA]
        + TRAIN,
        "protein_model_name_or_path",
        ESM,
        id="sft-new-model-from-hub-names",
    ),
    pytest.param(
        "sft",
        ["--dataset_name", "{tmp}", "--protein_model_name_or_path", "{tmp}", "--language_model_name_or_path", LLAMA]
        + TRAIN,
        "language_model_name_or_path",
        LLAMA,
        id="sft-llm-from-hub",
    ),
    pytest.param(
        "sft", ["--dataset_name", "{tmp}", "--model_name_or_path", SEPIT, *TRAIN], "model_name_or_path", SEPIT, id="sft"
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", SEPIT, "--output_dir", "{out}"],
        "model_name_or_path",
        SEPIT,
        id="evaluate-model",
    ),
    pytest.param(
        "pure_llm",
        ["--dataset_name", "{tmp}", "--language_model_name_or_path", LLAMA, *TRAIN],
        "language_model_name_or_path",
        LLAMA,
        id="pure-llm",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--pure_llm_model_name_or_path", LLAMA],
        "pure_llm_model_name_or_path",
        LLAMA,
        id="evaluate-pure-llm",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--bertscore_model", PUBMEDBERT],
        "bertscore_model",
        PUBMEDBERT,
        id="evaluate-bertscore-model",  # fixed: failed after generating every answer
    ),
    pytest.param(
        "main_job",
        ["--output_dir", "{out}", "--protein_model", ESM, "--language_model", LLAMA, "--text_encoder", PUBMEDBERT]
        + ["--max_steps", "1"],
        "protein_model",
        ESM,
        id="main-job",  # fixed: built the dataset, then a traceback from stage 0's subprocess
    ),
    pytest.param(
        "main_job",
        ["--output_dir", "{out}", "--bertscore_model", PUBMEDBERT, "--max_steps", "1"],
        "bertscore_model",
        PUBMEDBERT,
        id="main-job-bertscore",  # fixed: failed in the evaluation step, after training
    ),
    pytest.param(
        "stage0",
        ["--dataset_name", "{tmp}", "--protein_model_name_or_path", ESM, "--text_encoder_name_or_path", PUBMEDBERT]
        + TRAIN,
        "protein_model_name_or_path",
        ESM,
        id="stage0",
    ),
    pytest.param(
        "lora",
        ["--model_name_or_path", SEPIT, "--dataset_name", "{tmp}", *TRAIN],
        "model_name_or_path",
        SEPIT,
        id="lora",
    ),
]


@pytest.fixture(scope="module")
def clis() -> dict[str, Callable]:
    return {name: runpy.run_path(str(path))["main"] for name, path in SCRIPTS.items()}


@pytest.mark.parametrize(("cli", "argv", "argument", "repo"), OFFLINE_CASES)
def test_offline_cli_names_the_missing_repo(clis, offline, tmp_path, capsys, monkeypatch, cli, argv, argument, repo):
    main = clis[cli]
    monkeypatch.setitem(main.__globals__, LONG_STEPS[cli], MustNotRun())
    paths = {"tmp": str(tmp_path), "out": str(tmp_path / "out"), "model": str(tmp_path / "model")}
    (tmp_path / "model").mkdir()  # a local model folder, beside the output (never around it: an input)
    started = time.perf_counter()
    code = main([arg.format(**paths) for arg in argv])
    error = capsys.readouterr().err
    assert code == 2, error[-2000:]
    assert time.perf_counter() - started < 10
    assert "Traceback" not in error
    (line,) = [line for line in error.splitlines() if ": error: " in line]
    assert f"{argument}: HF_HUB_OFFLINE=1 and {repo} is neither a local folder nor in the local" in line, line
    assert HOW.format(repo=repo) in line, line
    assert not (tmp_path / "out").exists()


class MustNotRun:
    """Stands for what loads the model: calling it, or any of its attributes, fails the test."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the Hub name passed the offline check: the command went on to load it")

    def __getattr__(self, name: str):
        return self


def test_offline_main_job_stops_before_building_anything(tmp_path):
    """The real command in a new process: exit code 2 and one line within seconds, nothing written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "PYTHONPATH": str(ROOT)}
    argv = ["--output_dir", str(tmp_path / "out"), "--protein_model", ESM, "--language_model", LLAMA]
    argv += ["--text_encoder", PUBMEDBERT, "--max_steps", "1"]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "main_job.py"), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert time.perf_counter() - started < 60  # the import; before the fix it built the dataset first
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("main_job: error: protein_model: HF_HUB_OFFLINE=1 and facebook/esm2_t6_8M_UR50D"), line
    assert "hf download facebook/esm2_t6_8M_UR50D" in line and not (tmp_path / "out").exists()


def test_offline_pipeline_on_a_hub_name_raises_at_once(offline):
    """`pipeline()` reads the config through transformers before any SEPIT code runs: it raises its own OSError (which
    names neither the repository nor the file); `require_local_or_cached` gives the message that does."""
    started = time.perf_counter()
    with pytest.raises(OSError, match="offline mode"):
        pipeline("protein-qa", model=SEPIT)
    assert time.perf_counter() - started < 10
    with pytest.raises(ValueError, match=f"model: HF_HUB_OFFLINE=1 and {SEPIT} is neither") as info:
        require_local_or_cached(SEPIT, "model")
    assert HOW.format(repo=SEPIT) in str(info.value)


# --- no network connection -------------------------------------------------------------------------------------------


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection to (and name look-up of) a non-loopback address raises, and is recorded in case a library
    swallows the error."""
    attempts = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def refuse(address) -> None:
        host = address[0] if isinstance(address, tuple) else None  # AF_UNIX addresses are paths
        if host is not None and host not in LOOPBACK:
            attempts.append(address)
            raise ConnectionRefusedError(f"test_offline: network connection to {address} refused")

    def guarded_getaddrinfo(host, port, *args, **kwargs):
        refuse((host.decode() if isinstance(host, bytes) else host or "localhost", port))
        return getaddrinfo(host, port, *args, **kwargs)

    def guarded_connect(self, address):
        refuse(address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        refuse(address)
        return connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.mark.parametrize("hub_offline", [True, False], ids=["HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0"])
def test_pipeline_on_a_saved_folder_opens_no_connection(hub_folder, no_network, monkeypatch, hub_offline):
    with pytest.raises(ConnectionRefusedError):  # the guard works
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    no_network.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_offline)  # online mode too: a local folder needs no Hub
    qa = pipeline("protein-qa", model=str(hub_folder), trust_remote_code=True)  # as README says for saved folders
    out = qa({"question": "What is the function of <protein> ?", "sequence": "MKTAYIAKQR"}, max_new_tokens=3)
    assert isinstance(out[0]["answer"], str)
    model = AutoModel.from_pretrained(hub_folder, trust_remote_code=True)
    assert model.config.model_type == "sepit"
    assert no_network == []


# --- loading never executes code from data ---------------------------------------------------------------------------


class Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint would do (run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_checkpoint_is_read_without_running_its_code(tmp_path, capsys):
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config())
    benign, malicious = tmp_path / "benign", tmp_path / "malicious"
    for folder in (benign, malicious):
        model.config.save_pretrained(folder)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.save(state, benign / "pytorch_model.bin")
    marker = tmp_path / "payload-ran"
    torch.save({**state, "payload": Payload(marker)}, malicious / "pytorch_model.bin")

    # the safe path (torch.load(weights_only=True)) reads plain tensors ...
    loaded = SepitForConditionalGeneration.from_pretrained(benign)
    assert all(torch.equal(loaded.state_dict()[name], state[name]) for name in state)
    # ... and refuses anything else, without running it
    for load in (SepitForConditionalGeneration.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match="not a plain tensor checkpoint .*Weights only load failed") as caught:
            load(malicious)
        assert isinstance(caught.value.__cause__, pickle.UnpicklingError) and not marker.exists()
    # a CLI given such a folder (with its processor) exits 2 with one line, having run nothing
    folder = tmp_path / "converted"
    convert(ORIGINAL / "original-tiny-dense", folder)
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload(marker)}, folder / "pytorch_model.bin")
    evaluate = runpy.run_path(str(ROOT / "training" / "evaluate.py"))
    capsys.readouterr()  # the progress bars so far
    assert evaluate["main"](["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("evaluate: error: ") and "pytorch_model.bin: not a plain tensor checkpoint" in error
    assert "\n" not in error and "\x1b" not in error and not marker.exists()


SOURCES = ("modeling_sepit", "training", "dataset_card", "examples")
PICKLE_READERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"}


def _project_files() -> list[Path]:
    return sorted(path for folder in SOURCES for path in (ROOT / folder).rglob("*.py"))


def test_every_torch_load_passes_weights_only_and_no_pickle_reader_is_imported():
    loads, problems = 0, []
    for path in _project_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.module == "torch":
                    modules += [f"torch.{alias.name}" for alias in node.names]
                for module in modules:
                    if module.split(".")[0] in PICKLE_READERS or module == "torch.load":
                        problems.append(f"{where}: imports {module}")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.serialization.load"):
                loads += 1
                weights_only = [kw.value for kw in node.keywords if kw.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                    problems.append(f"{where}: {ast.unparse(node)} without weights_only=True")
    assert loads >= 1  # the converter's DeepSpeed expert pickles: the scan did see it
    assert not problems, problems


NO_REMOTE_CODE = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["modeling_sepit"] = None  # this project is not importable: only the folder's code could run
    sys.stdin = open(os.devnull)  # transformers asks on a terminal; here the answer is "no"
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline
    folder = sys.argv[1]
    refusals = {}
    for name, load in {
        "AutoModel": lambda: AutoModel.from_pretrained(folder),
        "AutoModel, trust_remote_code=False": lambda: AutoModel.from_pretrained(folder, trust_remote_code=False),
        "AutoModelForCausalLM": lambda: AutoModelForCausalLM.from_pretrained(folder),
        "AutoConfig": lambda: AutoConfig.from_pretrained(folder),
        "pipeline": lambda: pipeline("protein-qa", model=folder),
    }.items():
        try:
            load()
            refusals[name] = None
        except Exception as error:
            refusals[name] = f"{type(error).__name__}: {error}"
    ran = sorted(module for module in sys.modules if module.startswith("transformers_modules"))
    modules = os.environ["HF_MODULES_CACHE"]
    copied = [name for _, _, files in os.walk(modules) for name in files if name.endswith(".py")]
    print("\\n" + json.dumps({"refusals": refusals, "ran": ran, "copied": copied}))  # after the prompts' text
    """
)


def test_remote_code_runs_only_with_trust_remote_code(hub_folder, tmp_path):
    result = json.loads(run_in_fresh_python(NO_REMOTE_CODE, [str(hub_folder)], tmp_path).strip().splitlines()[-1])
    for name, refusal in result["refusals"].items():
        assert refusal is not None, f"{name} loaded the folder without trust_remote_code"
    for name in ("AutoModel", "AutoModel, trust_remote_code=False", "AutoModelForCausalLM", "AutoConfig"):
        assert "trust_remote_code=True" in result["refusals"][name], result["refusals"][name]
    assert result["ran"] == [] and not any(name.endswith("sepit.py") for name in result["copied"]), result
