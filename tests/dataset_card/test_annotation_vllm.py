"""`sepit-annotate --server` against a `sepit-serve` on loopback (the server fixture of
tests/modeling_sepit/test_serving.py, vLLM in `.venv-serve`): the README's command gives the table the transformers
path gives for the same model in fp32, a run cut short resumes without asking anything twice, a request the server
refuses skips its protein with the server's reason, and a URL that is no sepit-serve exits 2 with one line."""

import json
import re
import shlex
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch

from dataset_card.annotation import (
    ServerError,
    annotate,
    annotate_on_server,
    ask_server,
    main,
    question_set,
    read_proteins,
    server_request,
)
from dataset_card.uniprot_reader import ReadReport
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.serving import DEFAULT_VLLM_PYTHON, ProteinFront
from tests.conftest import ROOT, STRUCTURES
from tests.modeling_sepit import test_serving
from tests.test_readme import BASH_COMMANDS

pytestmark = pytest.mark.skipif(
    not DEFAULT_VLLM_PYTHON.is_file(),
    reason=f"{DEFAULT_VLLM_PYTHON} does not exist: `./run.sh test` (or `./run.sh serve`) sets up .venv-serve",
)
# test_serving's model (heads of 32, as vLLM's CPU attention needs) and its server, started once for this module.
served_folder, server = test_serving.served_folder, test_serving.server
NEW_TOKENS = 8
MAX_MODEL_LEN = 512  # the server fixture's --max-model-len
(README_COMMAND,) = [command for _, command in BASH_COMMANDS if "sepit-annotate" in command and "--server" in command]


def readme_argv(served_folder: Path, url: str, output: Path) -> list[str]:
    """The README's `sepit-annotate --server` command on the served model and server, writing to `output`, with
    answers of NEW_TOKENS tokens."""
    tokens = shlex.split(README_COMMAND)[1:]
    tokens[tokens.index("--model_name_or_path") + 1] = str(served_folder)
    tokens[tokens.index("--server") + 1] = url
    tokens[tokens.index("--output_dir") + 1] = str(output)
    return [*tokens, "--max_new_tokens", str(NEW_TOKENS)]


def table(folder: Path) -> pd.DataFrame:
    parquet = pd.read_parquet(folder / "annotations.parquet")
    csv = pd.read_csv(folder / "annotations.csv", keep_default_na=False)
    assert csv["answer"].tolist() == parquet["answer"].tolist()
    return parquet


@pytest.fixture(scope="module")
def two_structures(tmp_path_factory) -> Path:
    """2BEG (five chains of 26 residues) and 1AKI (129 residues, cut at the processor's 64)."""
    folder = tmp_path_factory.mktemp("structures")
    for name in ("biopython__2BEG.cif", "biotite__1aki.pdb"):
        shutil.copy(STRUCTURES / name, folder)
    return folder


@pytest.fixture(scope="module")
def on_vllm(served_folder, server, tmp_path_factory) -> tuple[Path, list[str]]:
    """(output folder, argv) of the README's command run on the server."""
    output = tmp_path_factory.mktemp("vllm") / "annotation"
    argv = readme_argv(served_folder, server[0], output)
    assert main(argv) == 0
    return output, argv


def test_the_readme_command_gives_the_transformers_table(on_vllm, served_folder, monkeypatch) -> None:
    output, argv = on_vllm
    monkeypatch.chdir(ROOT)  # the command names the repository's fixtures
    model = SepitForConditionalGeneration.from_pretrained(served_folder, dtype=torch.float32).eval()
    processor = SepitProcessor.from_pretrained(served_folder)
    proteins = read_proteins([argv[argv.index("--fasta") + 1]])
    questions = question_set(argv[argv.index("--questions") + 1 : argv.index("--server")])
    expected = pd.DataFrame(annotate(model, processor, proteins, questions, max_new_tokens=NEW_TOKENS, progress=False))
    rows = table(output)
    # Greedy, fp32: every answer equal (16 answers of 8 tokens; test_serving holds vLLM to protein-qa the same way).
    pd.testing.assert_frame_equal(rows, expected.astype(rows.dtypes.to_dict()))
    assert rows["answer"].nunique() > 1
    skipped = [json.loads(line) for line in (output / "skipped.jsonl").read_text().splitlines()]
    assert [record["entry"] for record in skipped] == ["BROKEN1"]  # the FASTA's record of bad letters


def test_a_run_cut_short_resumes_without_asking_twice(on_vllm, server, tmp_path) -> None:
    output, argv = on_vllm
    resumed = tmp_path / "annotation"
    (resumed / "shards").mkdir(parents=True)
    for name in ("settings.json", "rank-00000.jsonl"):
        lines = (output / "shards" / name).read_text().splitlines(keepends=True)
        (resumed / "shards" / name).write_text("".join(lines[:5]) + ('{"index": 9, "ans' if "rank" in name else ""))
    (resumed / ".sepit-output").write_text((output / ".sepit-output").read_text())
    argv = [*argv[: argv.index("--output_dir") + 1], str(resumed), *argv[argv.index("--output_dir") + 2 :]]
    assert main(argv) == 0
    pd.testing.assert_frame_equal(table(resumed), table(output))
    indices = [json.loads(line)["index"] for line in (resumed / "shards" / "rank-00000.jsonl").read_text().splitlines()]
    assert sorted(indices) == list(range(len(table(output))))  # the torn line cut, the first five not asked again
    assert main([arg for arg in argv if arg not in ("--server", server[0])]) == 2  # transformers may not resume it


def test_a_refused_request_skips_its_protein_with_the_reason(served_folder, server, two_structures) -> None:
    """A question long enough that a 64-residue protein's prompt plus NEW_TOKENS exceeds vLLM's --max-model-len and
    a 26-residue one's does not: the lengths are the server's own (its ProteinFront renders the prompts)."""
    proteins = read_proteins(structures=str(two_structures))
    short, long = sorted(proteins, key=lambda protein: len(protein.sequence))[:: len(proteins) - 1]
    front = ProteinFront(str(served_folder), torch.float32)

    def length(protein, question: str) -> int:
        return front.embeddings(front.prompt(server_request(protein, question, NEW_TOKENS))[0]).shape[0]

    words = next(
        n for n in range(0, 2000, 5) if length(long, "<protein> " + "x " * n) + NEW_TOKENS > MAX_MODEL_LEN + 10
    )
    question = "<protein> " + "x " * words
    assert length(short, question) + NEW_TOKENS < MAX_MODEL_LEN - 10
    report = ReadReport()
    rows = annotate_on_server(
        server[0], front.processor, [short, long], {"long": question}, True, report, max_new_tokens=NEW_TOKENS
    )
    assert [row["protein_id"] for row in rows] == [short.id]
    [problem] = report.problems
    assert (problem.file, problem.entry) == (long.source, long.id)
    assert problem.reason.startswith("the server refused question 'long': ") and str(MAX_MODEL_LEN) in problem.reason


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_sepit_serve_at_the_url_exits_2_with_one_line(
    served_folder, server, two_structures, tmp_path, capsys
) -> None:
    vllm_url = re.search(r"\(vLLM pid \d+ on (http://\S+)\)", server[3].read_text())[1]
    nobody = f"http://127.0.0.1:{free_port()}"
    for url, message in [
        (nobody, f"server: nothing answers at {nobody} ("),
        ("ftp://127.0.0.1:8000", "server: the base URL of a running sepit-serve"),
        ("http://127.0.0.1:99999", "server: the base URL of a running sepit-serve"),
        (vllm_url, f"server: {vllm_url}/health answered b'', not sepit-serve's"),
    ]:
        assert main(readme_argv(served_folder, url, tmp_path / "out")) == 2, url
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"annotate: error: {message}"), lines
    protein = read_proteins(structures=str(two_structures))[0]
    with pytest.raises(ServerError, match=f"server: {nobody} unreachable"):  # a server gone during a run
        ask_server(nobody, protein, "What is <protein> ?", NEW_TOKENS)
