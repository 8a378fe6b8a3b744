"""Fine-tune a pushed SEPIT model on Hugging Face Jobs: sends `examples/hub_finetune.py` with `huggingface_hub`'s
`run_uv_job` to run on the Hub's hardware (`--flavor`, `--timeout`), with your token as the job's HF_TOKEN secret, and
prints the job's id and URL. The job pushes the merged model, the LoRA adapter and a model card to `--output_repo`.
Offline mode, a missing token, an unknown flavor or a model/dataset that is not on the Hub stop it before anything
is sent. Options after `--` go to the script (`--method full`, `--num_train_epochs 3`, ...).

    python training/submit_hub_job.py --model me/sepit --dataset me/sepit-data --output_repo me/sepit-ft \\
        --flavor a10g-small --timeout 2h -- --num_train_epochs 3
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

from huggingface_hub import HfApi, JobHardware, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "hub_finetune.py"
# PEP 723's reference regex for a script's inline metadata block.
PEP_723 = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")
TIMEOUT = re.compile(r"^\d+(\.\d+)?[smhd]?$")
# Trackers the job can log to: the package it installs, and what it needs from this environment.
TRACKERS = {"trackio": ("env", "TRACKIO_SPACE_ID"), "wandb": ("secrets", "WANDB_API_KEY")}


def script_metadata(script: Path = SCRIPT) -> dict:
    """The script's `# /// script` block as TOML: its dependencies and its `[tool.hf-jobs]` launch defaults, which
    `hf jobs uv run` reads too, so both ways of launching agree."""
    blocks = [m for m in PEP_723.finditer(script.read_text(encoding="utf-8")) if m.group("type") == "script"]
    if len(blocks) != 1:
        raise ValueError(f"{script}: expected one `# /// script` block, found {len(blocks)}")
    content = "".join(line[2:] if line.startswith("# ") else line[1:] for line in blocks[0]["content"].splitlines(True))
    return tomllib.loads(content)


def fail(message: str) -> NoReturn:
    print(f"submit_hub_job.py: error: {message}", file=sys.stderr)
    sys.exit(2)


class OneLineErrors(argparse.ArgumentParser):
    """Argument errors as one line (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def parser(defaults: dict) -> OneLineErrors:
    doc = __doc__ or ""
    result = OneLineErrors(
        prog="submit_hub_job.py",
        allow_abbrev=False,
        usage="%(prog)s --model REPO --dataset REPO --output_repo REPO [options] [-- SCRIPT OPTIONS]",
        description=doc,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=40, width=120),
    )
    add = result.add_argument
    add("--model", required=True, help="SEPIT model repo on the Hub to fine-tune")
    add("--dataset", required=True, help="dataset repo on the Hub (python -m dataset_card.build_dataset's format)")
    add("--output_repo", required=True, help="model repo the job pushes the result to (created if missing)")
    add(
        "--flavor",
        default=defaults.get("flavor"),
        help=f"hardware (default: {defaults.get('flavor')}): " + ", ".join(h.value for h in JobHardware),
    )
    add(
        "--timeout",
        default=defaults.get("timeout"),
        help=f"the job's time limit: seconds, or with s/m/h/d (default: {defaults.get('timeout')})",
    )
    add(
        "--attempts",
        type=int,
        default=2,
        help="runs in all: a retried job resumes from its last checkpoint (default: 2)",
    )
    add("--namespace", default=None, help="user or organisation that runs (and pays for) the job (default: you)")
    add("--tracker", choices=sorted(TRACKERS), default=None, help="log losses to Trackio (TRACKIO_SPACE_ID) or W&B")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    launch = script_metadata()["tool"]["hf-jobs"]
    args = parser(launch).parse_args(argv[:split])
    script_args = argv[split + 1 :]

    if constants.HF_HUB_OFFLINE:
        fail("HF_HUB_OFFLINE=1: submitting a job needs the Hub; unset it")
    token = get_token()
    if not token:
        fail("no Hugging Face token: run `hf auth login` or set HF_TOKEN (the job pushes with it)")
    flavors = [hardware.value for hardware in JobHardware]
    if args.flavor not in flavors:
        fail(f"--flavor {args.flavor!r} is not a Jobs flavor; choose one of {', '.join(flavors)}")
    if not TIMEOUT.match(str(args.timeout)):
        fail(f"--timeout {args.timeout!r}: give seconds or a number with s, m, h or d (e.g. 90m, 2h)")
    if args.attempts < 1:
        fail(f"--attempts must be >= 1, got {args.attempts}")
    for name in ("model", "dataset", "output_repo"):
        try:
            validate_repo_id(getattr(args, name))
        except HFValidationError:
            fail(f"--{name} {getattr(args, name)!r} is not a Hub repo id (owner/name); the job reads and writes the "
                 "Hub only: push a local folder first")  # fmt: skip
    env, secrets, dependencies = {}, {"HF_TOKEN": token}, []
    if args.tracker:
        where, variable = TRACKERS[args.tracker]
        if not os.environ.get(variable):
            fail(f"--tracker {args.tracker} needs {variable} in this environment")
        (env if where == "env" else secrets)[variable] = os.environ[variable]
        dependencies.append(args.tracker)
        script_args = ["--report_to", args.tracker, *script_args]

    api = HfApi(token=token)
    try:
        for name, repo_type in (("model", "model"), ("dataset", "dataset")):
            if not api.repo_exists(getattr(args, name), repo_type=repo_type):
                fail(f"--{name} {getattr(args, name)}: no such {repo_type} repo on the Hub (or your token cannot read "
                     "it)")  # fmt: skip
        job = api.run_uv_job(
            str(SCRIPT),
            script_args=["--model", args.model, "--dataset", args.dataset, "--output_repo", args.output_repo]
            + script_args,
            dependencies=dependencies or None,
            env=env or None,
            secrets=secrets,
            flavor=args.flavor,
            timeout=args.timeout,
            attempts=args.attempts,
            namespace=args.namespace,
        )
    except OSError as error:  # the Hub refused or could not be reached
        fail(" ".join(str(error).split()))
    print(f"job id:  {job.id}")
    print(f"job url: {job.url}")
    print(f"logs:    hf jobs logs -f {job.id}")
    print(f"result:  {constants.ENDPOINT}/{args.output_repo} (merged model, adapter/, model card)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
