"""`sepit-serve` (modeling_sepit/serving.py) on loopback: one server per module, started as `./run.sh serve` starts
it, with vLLM in `.venv-serve`. Greedy answers about real proteins (with and without structure, both request forms,
sent concurrently) equal `pipeline("protein-qa")`'s in fp32, the README's requests are answered, malformed requests
get a 400 naming the field and the next good one is answered, and SIGTERM stops the server and its vLLM child."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.serving import DEFAULT_VLLM_PYTHON
from tests.conftest import ROOT, STRUCTURES, read_chain

pytestmark = pytest.mark.skipif(
    not DEFAULT_VLLM_PYTHON.is_file(),
    reason=f"{DEFAULT_VLLM_PYTHON} does not exist: `./run.sh test` (or `./run.sh serve`) sets up .venv-serve",
)
NEW_TOKENS = 16
READY = re.compile(r"^sepit-serve: .* on (http://127\.0\.0\.1:\d+)/v1/chat/completions \(vLLM pid (\d+) ")


@pytest.fixture(scope="module")
def served_folder(tiny_parts, tmp_path_factory) -> Path:
    """A SEPIT folder from the tiny parts whose LLM has the tiny shape with 2 heads of 32: vLLM's CPU attention takes
    head sizes 32, 64, ... and refuses the tiny parts' 16 ("Unsupported CPU attention configuration: head_dim=16")."""
    folder = tmp_path_factory.mktemp("serving")
    config = AutoConfig.from_pretrained(tiny_parts / "language_model")
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, config.hidden_size // 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "llm")
    AutoTokenizer.from_pretrained(tiny_parts / "language_model").save_pretrained(folder / "llm")
    processor = SepitProcessor.from_pretrained_parts(tiny_parts / "protein_model", folder / "llm")
    processor.max_protein_length = 64
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", folder / "llm", protein_token_id=processor.protein_token_id
    )
    model.save_pretrained(folder / "sepit")
    processor.save_pretrained(folder / "sepit")
    return folder / "sepit"


@pytest.fixture(scope="module")
def server(served_folder, tmp_path_factory):
    """(base URL, vLLM pid, server process, log path) of a running server; stopped at the end of the module."""
    log = tmp_path_factory.mktemp("serving-log") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "modeling_sepit.serving", "--model_name_or_path", str(served_folder), "--port", "0",
        "--dtype", "float32", "--vllm_args", "--max-model-len 512 --enforce-eager",
    ]  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (found := [READY.match(line) for line in log.read_text().splitlines() if READY.match(line)]):
            assert process.poll() is None, f"sepit-serve exited {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"sepit-serve not ready after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield found[0][1], int(found[0][2]), process, log
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def real_requests() -> list[tuple[dict, object]]:
    """(server request, the same for pipeline("protein-qa")): real proteins with and without structure."""
    lysozyme, lysozyme_ca = read_chain(STRUCTURES / "biotite__1aki.pdb", "A")
    headpiece, _ = read_chain(STRUCTURES / "biopython__1LCD.pdb", "A")
    with_coords = {"sequence": lysozyme, "coords": lysozyme_ca.tolist()}
    from_file = {"structure": str(STRUCTURES / "biopython__2BEG.cif"), "chain": "A"}
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "protein", "structure": str(STRUCTURES / "graphein__4hhb.pdb"), "chain": "B"},
                {"type": "text", "text": "Where is it located ?"},
            ],
        }
    ]
    questions = [
        ("What is the function of <protein> ?", with_coords),
        ("Is it an enzyme ?", {"sequence": headpiece}),
        ("<protein>\nDescribe it in one line.", from_file),
        ("What is the function of <protein> ?", {"sequence": headpiece}),
    ]
    pairs = [
        ({"question": question, "protein": protein, "max_tokens": NEW_TOKENS}, {"question": question, **protein})
        for question, protein in questions
    ]
    return [*pairs, ({"messages": chat, "max_tokens": NEW_TOKENS}, chat)]


@pytest.fixture(scope="module")
def protein_qa(served_folder):
    model = SepitForConditionalGeneration.from_pretrained(served_folder, dtype=torch.float32).eval()
    return pipeline("protein-qa", model=model, processor=SepitProcessor.from_pretrained(served_folder))


def test_greedy_answers_equal_protein_qa(server, protein_qa) -> None:
    url = server[0]
    requests = real_requests()
    with ThreadPoolExecutor(len(requests)) as pool:  # concurrent: vLLM batches them
        replies = list(pool.map(lambda pair: post(url, pair[0]), requests))
    expected = protein_qa([inputs for _, inputs in requests], max_new_tokens=NEW_TOKENS, do_sample=False)
    expected_ids = protein_qa(
        [inputs for _, inputs in requests], max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True
    )
    eos = protein_qa.processor.tokenizer.eos_token_id
    for (status, reply), answer, ids in zip(replies, expected, expected_ids, strict=True):
        assert status == 200, reply
        choice = reply["choices"][0]
        assert choice["message"]["content"].strip() == answer[0]["answer"]
        assert choice["token_ids"] == ids[0]["generated_token_ids"][-len(choice["token_ids"]) :]
        assert choice["finish_reason"] == ("stop" if choice["token_ids"][-1] == eos else "length")
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] == len(choice["token_ids"])


def readme_requests() -> list[dict]:
    """The ```json request bodies of the README's serving section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Serving with vLLM", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", section, re.S)]


def test_readme_requests_are_answered(server) -> None:
    bodies = readme_requests()
    assert len(bodies) == 2
    for body in bodies:
        status, reply = post(server[0], body)
        assert status == 200, reply
        assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] > 0


MALFORMED = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    ({"question": "What is it ?", "protein": {"sequence": "MKV"}, "n_best": 3}, "n_best"),
    ({"protein": {"sequence": "MKV"}}, "question"),
    ({"question": "  ", "protein": {"sequence": "MKV"}}, "question"),
    ({"question": "What is it ?", "protein": {"sequence": "MK1V"}}, "protein"),
    ({"question": "What is it ?", "protein": {"seq": "MKV"}}, "protein"),
    ({"question": "What is it ?", "protein": {"sequence": "MKV", "coords": [[1.0, 2.0]]}}, "protein"),
    ({"question": "What is it ?", "protein": {"structure": "no/such/file.pdb"}}, "protein"),
    ({"question": "What is it ?", "protein": "MKV"}, "protein"),
    ({"question": "What is it ?", "protein": {"sequence": "MKV"}, "max_tokens": 0}, "max_tokens"),
    ({"question": "What is it ?", "protein": {"sequence": "MKV"}, "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "What is <protein> ?"}]}, "messages"),
    ({"question": "What is it ?", "protein": {"sequence": "MKV"}, "max_tokens": 4000}, "max_tokens"),  # vLLM's 400
]


@pytest.mark.parametrize(("body", "field"), MALFORMED, ids=[f"{i}-{field}" for i, (_, field) in enumerate(MALFORMED)])
def test_malformed_request_is_400_naming_the_field(server, body, field) -> None:
    status, reply = post(server[0], body)
    assert status == 400, reply
    assert reply["error"]["message"].startswith(f"{field}:") or field in reply["error"]["message"], reply
    assert reply["error"]["param"] == field or field == "max_tokens", reply
    status, reply = post(server[0], {"question": "Is it an enzyme ?", "protein": {"sequence": "MKV"}, "max_tokens": 2})
    assert status == 200, reply  # the server keeps serving


def process_group(pgid: int) -> list[int]:
    """The live processes of a process group (vLLM's server leads its own, its engine core is in it)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_sigterm_stops_the_server_and_vllm(server) -> None:
    url, vllm_pid, process, log = server
    assert vllm_pid in process_group(vllm_pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-3000:]
    assert "sepit-serve: stopping" in log.read_text()
    assert process_group(vllm_pid) == []  # vLLM and its engine core stopped before the server exited
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
