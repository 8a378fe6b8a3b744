"""Malformed inputs on the data and command-line side (issue 13), one table per class of the issue, each case beyond
the issue's own example marked as such by its id:

1. output paths that hold data: a command replaces only what it wrote itself (its `.sepit-output` marker), an empty
   folder or a new path, unless `--overwrite`; it never writes into, over or around one of its inputs;
2. real old Swiss-Prot entries: read (lines SEPIT never uses are dropped before parsing), and every reason printed;
3. datasets the next command would refuse: every dataset the builder writes loads and trains, or is refused;
4. one bad input among good ones: reported and skipped, the run goes on;
5. odd values in UniProt entries: reported with the field, never written into the dataset;
8. files that are not files: named pipes, link loops, devices, gzip bombs, byte-order marks;
9. command-line arguments that the libraries would refuse late, with a traceback: exit 2 and one line naming them.

Property tests draw random field types and values into real JSON, XML and flat-file entries: every entry is read, or
reported with a reason that starts with the field at fault.
"""

import copy
import gzip
import hashlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from datasets import load_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataset_card import build_dataset as build_dataset_module
from dataset_card import external_benchmarks
from dataset_card.build_dataset import BuildArguments, build_dataset
from dataset_card.uniprot_reader import ReadReport, entry_from_json, iter_entries
from modeling_sepit import convert_original_sepit as converter
from modeling_sepit import structure_loading
from modeling_sepit.atomic_folder import MARKER, check_output_path, claim_output_folder
from modeling_sepit.structure_loading import load_structure
from tests.conftest import FIXTURES, ORIGINAL, ROOT, SCRIPTS, STRUCTURES

UNIPROT = FIXTURES / "uniprot"
OLD = FIXTURES / "uniprot_old"
DENSE = ORIGINAL / "original-tiny-dense"
P00698 = json.loads(gzip.decompress((UNIPROT / "P00698.json.gz").read_bytes()))["results"][0]
LYSOZYME = P00698["sequence"]["value"]
NS = "{http://uniprot.org/uniprot}"
ElementTree.register_namespace("", NS[1:-1])  # XML written back keeps UniProt's default namespace
LONG_STEPS = {
    "evaluate": "evaluate_benchmark",
    "main_job": "run",
    "sft": "SepitSFTTrainer",
    "stage0": "SepitPretrainingTrainer",
    "lora": "SepitSFTTrainer",
}


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def snapshot(path: Path) -> dict[str, str]:
    """Every file below `path` (or `path` itself) with the sha256 of its content: what a refused command must keep."""
    if path.is_symlink() or path.is_file():
        return {".": os.readlink(path) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


def json_file(path: Path, *entries: object) -> Path:
    return write(path, json.dumps({"results": list(entries)}))


def json_entry(accession: str = "P99999", **members: object) -> dict:
    """A small UniProt REST entry: lysozyme's sequence with `members` added."""
    return {
        "primaryAccession": accession,
        "uniProtkbId": f"{accession}_TEST",
        "sequence": {"value": LYSOZYME},
        **members,
    }


def annotated(accession: str, sequence: str) -> dict:
    """An entry with a name, a function and keywords: a caption and questions."""
    return json_entry(
        accession,
        sequence={"value": sequence},
        proteinDescription={"recommendedName": {"fullName": {"value": f"Protein {accession}"}}},
        organism={"scientificName": "Gallus gallus"},
        comments=[{"commentType": "FUNCTION", "texts": [{"value": f"Does what {accession} does."}]}],
        keywords=[{"name": "Hydrolase"}, {"name": f"Keyword {accession}"}],
    )


# Three unrelated sequences (below 50% identity to each other), so that each protein is its own homology cluster.
SEQUENCES = (
    LYSOZYME,
    "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQWERPSGNSSSGGKNGQGEPARVRCSHLLVKHSQSRRPSSWRQEKITRTKEEALELINGYIQKIKSGEEDFESLASQFSDCSSAKARGDLGAFSRGQMQKPFEDASFALRTGEMSGPVFTDSGIHIILRTE",
    "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHMKQHDFFKSAMPEGYVQERTIFFKDDGNYK",
)


# --- command lines ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clis() -> dict[str, Callable]:
    mains = {name: runpy.run_path(str(path))["main"] for name, path in SCRIPTS.items()}
    mains["tiny_parts"] = runpy.run_path(str(ROOT / "training" / "build_tiny_parts.py"))["main"]
    return mains | {
        "build_dataset": build_dataset_module.main,
        "external_benchmarks": external_benchmarks.main,
        "convert": converter.main,
    }


def _must_not_run(*args, **kwargs):
    raise AssertionError("the arguments passed validation: the command would have started its long run")


def run_cli(clis, cli: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Exit code and stderr of a command line run in this process; its long step (training, generation) is replaced
    by one that fails the test, so a case that wrongly passes validation stops at once."""
    main = clis[cli]
    if cli in LONG_STEPS:
        monkeypatch.setitem(main.__globals__, LONG_STEPS[cli], _must_not_run)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, error: str, fragments: list[str]) -> str:
    assert code == 2, error[-2000:]
    assert "Traceback" not in error and "usage:" not in error
    lines = [line for line in error.splitlines() if ": error: " in line]  # progress bars also write to stderr
    assert len(lines) == 1, error[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data-side") / "converted"
    converter.convert(DENSE, folder, protein_padding_length=48)
    return folder


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """A dataset of three unrelated annotated proteins: every split of both configs has rows."""
    root = tmp_path_factory.mktemp("small-dataset")
    entries = [annotated(f"P0000{i}", sequence) for i, sequence in enumerate(SEQUENCES, start=1)]
    uniprot = json_file(root / "uniprot" / "three.json", *entries)
    output = root / "dataset"
    build_dataset(BuildArguments(output_dir=str(output), uniprot=[str(uniprot)], structures="none"))
    return output


# --- class 1: output paths that hold data ----------------------------------------------------------------------------


@pytest.fixture
def places(tmp_path, converted, small_dataset) -> dict[str, str]:
    """Paths a command could be pointed at: copies of real inputs, someone's files, another command's output."""
    shutil.copytree(DENSE, tmp_path / "original")
    shutil.copy(UNIPROT / "P05067.dat", write(tmp_path / "uniprot" / "P00698.json", json.dumps(P00698)).parent)
    shutil.copytree(STRUCTURES, tmp_path / "structures", ignore=shutil.ignore_patterns("*.cif", "SOURCES.md"))
    write(tmp_path / "mine" / "thesis.tex", "three years of work")
    write(tmp_path / "file.txt", "not a folder")
    write(tmp_path / "trained" / MARKER, json.dumps({"writer": "sft"}))
    write(tmp_path / "trained" / "model.safetensors", "weights that took a week")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    shutil.copytree(small_dataset, tmp_path / "dataset")
    shutil.copytree(converted, tmp_path / "model")
    return {name.removesuffix(".txt"): str(tmp_path / name) for name in os.listdir(tmp_path)} | {"tmp": str(tmp_path)}


BUILD = ["--structures", "none"]
LORA = ["--model_name_or_path", "{model}", "--dataset_name", "{dataset}", "--use_cpu", "true", "--bf16", "false"]
SFT = ["--model_name_or_path", "{model}", "--dataset_name", "{dataset}", "--use_cpu", "true", "--report_to", "none"]

# (command, arguments, the path that must stay as it was, what the one error line says)
OUTPUT_CASES = [
    pytest.param(
        "convert",
        ["--input_dir", "{original}", "--output_dir", "{original}"],
        "original",
        ["output_dir: ", "is or holds the input"],
        id="example-convert-into-its-input",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}", "--output_dir", "{uniprot}", *BUILD],
        "uniprot",
        ["is or holds the input"],
        id="example-build-into-the-uniprot-folder",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}", "--output_dir", "{file}", *BUILD],
        "file",
        ["is an existing file", "--overwrite"],
        id="example-build-over-a-regular-file",
    ),
    pytest.param(
        "convert",
        ["--input_dir", "{original}", "--output_dir", "{original}/converted"],
        "original",
        ["lies inside the input"],
        id="convert-inside-its-input",
    ),
    pytest.param(
        "convert",
        ["--input_dir", "{original}", "--output_dir", "{tmp}"],
        "original",
        ["is or holds the input"],
        id="convert-over-the-folder-holding-its-input",
    ),
    pytest.param(
        "convert",
        ["--input_dir", "{original}", "--output_dir", "{mine}"],
        "mine",
        [f"no {MARKER} marker", "--overwrite"],
        id="convert-over-someones-folder",
    ),
    pytest.param(
        "convert",
        ["--input_dir", "{original}", "--output_dir", "{original}", "--overwrite", "true"],
        "original",
        ["is or holds the input"],
        id="convert-into-its-input-even-with-overwrite",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}", "--output_dir", "{mine}", *BUILD],
        "mine",
        [f"no {MARKER} marker"],
        id="build-over-someones-folder",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}", "--output_dir", "{trained}", *BUILD],
        "trained",
        ["holds the output of sft"],
        id="build-over-a-trained-model",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}", "--structures", "{structures}", "--output_dir", "{structures}/dataset"],
        "structures",
        ["lies inside the input"],
        id="build-inside-the-structures-folder",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}/P05067.dat", "--output_dir", "{uniprot}/P05067.dat", *BUILD, "--overwrite"],
        "uniprot",
        ["is or holds the input"],
        id="build-over-its-input-file-even-with-overwrite",
    ),
    pytest.param(
        "build_dataset",
        ["--uniprot", "{uniprot}", "--output_dir", "{link}", *BUILD],
        "mine",
        ["is a symbolic link"],
        id="build-over-a-link",
    ),
    pytest.param(
        "external_benchmarks",
        ["--uniprot_dir", "{uniprot}", "--output_dir", "{uniprot}"],
        "uniprot",
        ["is or holds the input"],
        id="external-benchmarks-into-its-uniprot-folder",
    ),
    pytest.param(
        "tiny_parts",
        ["--dataset_dir", "{dataset}", "--output_dir", "{dataset}"],
        "dataset",
        ["is or holds the input"],
        id="tiny-parts-over-their-dataset",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{model}"],
        "model",
        ["is or holds the input"],
        id="evaluate-over-the-model",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{mine}"],
        "mine",
        [f"no {MARKER} marker"],
        id="evaluate-over-someones-folder",
    ),
    pytest.param("sft", [*SFT, "--output_dir", "{model}"], "model", ["is or holds the input"], id="sft-over-its-model"),
    pytest.param(
        "sft", [*SFT, "--output_dir", "{dataset}/run"], "dataset", ["lies inside the input"], id="sft-inside-its-data"
    ),
    pytest.param("sft", [*SFT, "--output_dir", "{file}"], "file", ["is an existing file"], id="sft-over-a-file"),
    pytest.param(
        "stage0",
        ["--model_name_or_path", "{model}", "--dataset_name", "{dataset}", "--output_dir", "{mine}"],
        "mine",
        [f"no {MARKER} marker"],
        id="stage0-into-someones-folder",
    ),
    pytest.param(
        "lora",
        [*LORA, "--output_dir", "{tmp}/lora", "--merged_dir", "{model}"],
        "model",
        ["merged_dir: ", "is or holds the input"],
        id="lora-merged-over-its-base-model",
    ),
    pytest.param(
        "lora", [*LORA, "--output_dir", "{trained}"], "trained", ["holds the output of sft"], id="lora-over-sft-output"
    ),
    pytest.param(
        "main_job", ["--output_dir", "{mine}"], "mine", [f"no {MARKER} marker"], id="main-job-in-a-full-folder"
    ),
    pytest.param("main_job", ["--output_dir", "{file}"], "file", ["is an existing file"], id="main-job-over-a-file"),
    pytest.param(
        "main_job",
        ["--output_dir", "{dataset}/main", "--dataset_dir", "{dataset}"],
        "dataset",
        ["lies inside the input"],
        id="main-job-inside-its-dataset",
    ),
]


@pytest.mark.parametrize(("cli", "argv", "kept", "fragments"), OUTPUT_CASES)
def test_output_paths_that_hold_data_are_refused(clis, places, monkeypatch, capsys, cli, argv, kept, fragments):
    before = snapshot(Path(places[kept]))
    code, error = run_cli(clis, cli, [arg.format(**places) for arg in argv], monkeypatch, capsys)
    assert_one_error_line(code, error, fragments)
    assert snapshot(Path(places[kept])) == before


def test_a_command_replaces_its_own_output_and_others_only_with_overwrite(places, capsys):
    argv = ["--uniprot", places["uniprot"], *BUILD, "--output_dir"]
    assert build_dataset_module.main([*argv, places["tmp"] + "/new"]) == 0  # a new path
    assert json.loads(Path(places["tmp"], "new", MARKER).read_text()) == {"writer": "build_dataset"}
    assert build_dataset_module.main([*argv, places["tmp"] + "/new", "--seed", "3"]) == 0  # its own output
    empty = Path(places["tmp"], "empty")
    empty.mkdir()
    assert build_dataset_module.main([*argv, str(empty)]) == 0  # an empty folder holds nothing to lose
    for other in ("mine", "file", "trained"):
        assert build_dataset_module.main([*argv, places[other], "--overwrite", "true"]) == 0
        assert (Path(places[other]) / "README.md").is_file() and not Path(places[other], "thesis.tex").exists()
    capsys.readouterr()


def test_a_run_continues_in_the_folder_of_its_own_earlier_run(places):
    folder = Path(places["tmp"], "stage1")
    write(folder / MARKER, json.dumps({"writer": "sft"}))
    write(folder / "checkpoint-5" / "trainer_state.json", "{}")
    assert check_output_path(folder, "sft", [places["model"]]) == folder
    with pytest.raises(ValueError, match="holds the output of sft"):
        check_output_path(folder, "stage0_encoder_warmup", [places["model"]])


def test_the_main_job_may_hold_the_dataset_it_reads_but_no_step_may_replace_it(places):
    main, dataset = Path(places["tmp"], "main"), Path(places["tmp"], "main", "dataset")
    write(main / MARKER, json.dumps({"writer": "main_job"}))
    shutil.copytree(places["dataset"], dataset)  # built by an earlier run of the job, read by this one
    assert claim_output_folder(main, "main_job", [dataset], may_hold_inputs=True) == main
    with pytest.raises(ValueError, match="is or holds the input"):
        check_output_path(main, "build_dataset", [dataset])
    with pytest.raises(ValueError, match="lies inside the input"):
        check_output_path(dataset / "parts", "build_tiny_parts", [dataset])


# --- class 2: real old Swiss-Prot entries ----------------------------------------------------------------------------


def old(name: str) -> str:
    return (OLD / f"biopython__{name}").read_text()


# (file contents, accessions read) for entries of releases 1-40 (1986-2000) and their oddities
OLD_CASES = [
    pytest.param(old("sp005"), ["P24973"], id="example-GN-A-OR-B-line"),
    pytest.param(old("sp004"), ["P23082"], id="GN-four-names-and-broken-RC"),
    pytest.param(old("sp008"), ["P01892"], id="two-AC-lines-release-1-DT"),
    pytest.param(old("sp014"), ["P12166"], id="OX-over-two-lines"),
    pytest.param(old("sp006"), ["P39896"], id="comment-without-topic"),
    pytest.param(old("sp007"), ["O95832"], id="broken-RX-and-DR-lines"),
    pytest.param(old("sp003"), ["P42655"], id="upper-case-DT-REL"),
    pytest.param(old("sp015"), ["IPI00383150"], id="IPI-record-without-DE"),
    pytest.param(old("sp012") + old("sp013"), ["Q9Y736", "P82909"], id="TrEMBL-2001-records-in-one-file"),
    pytest.param(old("sp001").replace("\n", "\r\n"), ["Q13454"], id="windows-line-ends"),
    pytest.param(old("sp002") + old("sp016"), ["P54101", "P01100"], id="1996-and-2007-entries-together"),
]


@pytest.mark.parametrize(("text", "accessions"), OLD_CASES)
def test_old_entries_are_read(tmp_path, text, accessions):
    for name, data in (("old.dat", text.encode()), ("old.dat.gz", gzip.compress(text.encode()))):
        report = ReadReport()
        entries = list(iter_entries(write(tmp_path / name, data), report))
        assert [entry.accession for entry in entries] == accessions and not report.problems
        assert all(entry.protein_name and entry.organism for entry in entries if not entry.accession.startswith("IPI"))


def test_every_reason_is_printed_when_every_entry_fails(tmp_path, capsys):
    spoiled = [old(name).replace("\n     ", "\n     12", 1) for name in ("sp001", "sp002", "sp003")]  # digits
    uniprot = write(tmp_path / "all-bad.dat", "".join(spoiled))
    code = build_dataset_module.main(["--uniprot", str(uniprot), *BUILD, "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert_one_error_line(code, error, ["no readable entry", "3 problems reported"])
    skipped = [line for line in error.splitlines() if line.startswith("skipped ")]
    assert [line.split("[")[1].split("]")[0] for line in skipped] == ["Q13454", "P54101", "P42655"]
    assert all("sequence: invalid amino-acid letters ('1' at 0" in line for line in skipped)


# --- class 3: datasets the next command would refuse -----------------------------------------------------------------


def build_args(tmp: Path, *entries: dict, **kwargs) -> BuildArguments:
    uniprot = json_file(tmp / "uniprot.json", *entries)
    return BuildArguments(output_dir=str(tmp / "dataset"), uniprot=[str(uniprot)], structures="none", **kwargs)


BARE = json_entry("P77777")  # a sequence and nothing SEPIT can ask about
NAMED = json_entry(
    "P77778",
    proteinDescription={"recommendedName": {"fullName": {"value": "Named protein"}}},
    organism={"scientificName": "Homo sapiens"},
)  # a caption, no question

# (entries, builder arguments, what the refusal says)
REFUSED_DATASETS = [
    pytest.param([BARE], {}, ["captions config would have no train row", "no annotation"], id="example-no-annotation"),
    pytest.param([NAMED], {}, ["instructions config would have no train row"], id="caption-but-no-question"),
    pytest.param([BARE, NAMED], {}, ["no train row"], id="two-entries-without-questions"),
    pytest.param(
        [annotated("P00001", SEQUENCES[0])],
        {"split_fractions": [0.2, 0.4, 0.4]},
        ["no protein is in the train split", "raise the train fraction"],
        id="one-protein-that-goes-to-validation",
    ),
    pytest.param(
        [annotated("P00001", SEQUENCES[0])],
        {"split_fractions": [0.0, 0.0, 1.0]},
        ["split_fractions: the train fraction is 0"],
        id="fractions-0-0-1",
    ),
    pytest.param(
        [annotated("P00001", SEQUENCES[0])],
        {"split_fractions": [0.0, 1.0, 0.0]},
        ["the train fraction is 0"],
        id="fractions-0-1-0",
    ),
]


@pytest.mark.parametrize(("entries", "kwargs", "fragments"), REFUSED_DATASETS)
def test_datasets_that_could_not_train_are_refused(tmp_path, entries, kwargs, fragments):
    with pytest.raises(ValueError) as info:
        build_dataset(build_args(tmp_path, *entries, **kwargs))
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)
    assert not (tmp_path / "dataset").exists()


def annotated_entries(count: int) -> list[dict]:
    return [annotated(f"P0000{i}", SEQUENCES[i]) for i in range(count)]


# (entries, builder arguments, the splits written)
LOADABLE_DATASETS = [
    pytest.param(annotated_entries(1), {}, {"train"}, id="example-one-protein"),
    pytest.param(annotated_entries(2), {}, {"train", "validation"}, id="two-proteins"),
    pytest.param(annotated_entries(3), {"split_fractions": [1.0, 0.0, 0.0]}, {"train"}, id="fractions-1-0-0"),
    pytest.param(annotated_entries(3), {"split_fractions": [0.5, 0.5, 0.0]}, {"train", "validation"}, id="no-test"),
    pytest.param(annotated_entries(3), {"split_fractions": [0.5, 0.0, 0.5]}, {"train", "test"}, id="no-validation"),
    pytest.param([*annotated_entries(1), BARE, NAMED], {}, {"train", "validation", "test"}, id="with-bare-entries"),
]


@pytest.mark.parametrize(("entries", "kwargs", "splits"), LOADABLE_DATASETS)
def test_every_dataset_written_loads_with_each_config(tmp_path, entries, kwargs, splits):
    result = build_dataset(build_args(tmp_path, *entries, **kwargs))
    for config in ("captions", "instructions"):
        dataset = load_dataset(str(result.output_dir), config, cache_dir=str(tmp_path / "cache"))
        assert set(dataset) <= splits and "train" in dataset and all(len(rows) for rows in dataset.values())


def sft_argv(parts: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "training" / "recipes" / "tiny" / "stage1.yaml"),
        "--dataset_name", str(dataset),
        "--protein_model_name_or_path", str(parts / "protein_model"),
        "--language_model_name_or_path", str(parts / "language_model"),
        "--encoder_warmup_dir", "", "--max_protein_length", "32", "--per_device_train_batch_size", "1",
        "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(output), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("count", "fractions"), [(1, "0.8 0.1 0.1"), (3, "1 0 0")], ids=["example-one-protein", "fractions-1-0-0"]
)
def test_the_smallest_datasets_train_with_sft(tiny_parts, tmp_path, clis, count, fractions):
    uniprot = json_file(tmp_path / "uniprot.json", *annotated_entries(count))
    argv = ["--uniprot", str(uniprot), *BUILD, "--output_dir", str(tmp_path / "dataset"), "--split_fractions"]
    assert build_dataset_module.main([*argv, *fractions.split()]) == 0
    for config in ("captions", "instructions"):
        output = tmp_path / f"sft-{config}"
        assert clis["sft"](sft_argv(tiny_parts, tmp_path / "dataset", output, "--dataset_config", config)) == 0
        assert (output / "model.safetensors").is_file()


def test_missing_held_out_splits_are_named_by_the_next_command(tmp_path, clis, converted, monkeypatch, capsys):
    build_dataset(build_args(tmp_path, *annotated_entries(1)))
    argv = ["--model_name_or_path", str(converted), "--dataset_name", str(tmp_path / "dataset")]
    code, error = run_cli(clis, "evaluate", [*argv, "--output_dir", str(tmp_path / "eval")], monkeypatch, capsys)
    assert_one_error_line(code, error, ["Unknown split", "test"])
    argv += ["--output_dir", str(tmp_path / "sft"), "--eval_strategy", "steps", "--use_cpu", "true"]
    code, error = run_cli(clis, "sft", argv, monkeypatch, capsys)
    assert_one_error_line(code, error, ["dataset_test_split", "no split 'validation'"])


# --- class 4: one bad input among good ones --------------------------------------------------------------------------


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a named pipe opened for reading blocks until a writer comes)."""

    def expired(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def link(path: Path, target: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


# (make the bad input beside a good file in `folder`, the problem's entry, what its reason says)
BAD_UNIPROT_INPUTS = [
    pytest.param(
        lambda d: write(d / "r.json", '{"results": 5}'),
        "whole file",
        "results: expected an array",
        id="example-results-5",
    ),
    pytest.param(lambda d: write(d / "n.json", "null"), "whole file", "got null", id="example-null"),
    pytest.param(lambda d: write(d / "rn.json", '{"results": null}'), "whole file", "got null", id="results-null"),
    pytest.param(
        lambda d: write(d / "l.json", "[5]"), "entry #0", "entry: expected an object, got int 5", id="array-of-5"
    ),
    pytest.param(
        lambda d: write(d / "o.json", '{"messages": ["rate limited"]}'),
        "whole file",
        "keys ['messages']",
        id="rest-error",
    ),
    pytest.param(lambda d: write(d / "t.json", '{"results": [{"prim'), "whole file", "JSONDecodeError", id="cut-json"),
    pytest.param(lambda d: write(d / "s.json", '"P05067"'), "whole file", "not UniProt JSON", id="json-string"),
    pytest.param(lambda d: fifo(d / "pipe.dat"), "whole file", "a named pipe", id="named-pipe"),
    pytest.param(
        lambda d: link(d / "gone.dat", "nowhere.dat"), "whole file", "broken symbolic link", id="dangling-link"
    ),
    pytest.param(lambda d: link(d / "loop.dat", "loop.dat"), "whole file", "symbolic link loop", id="link-loop"),
    pytest.param(lambda d: link(d / "dev.dat", "/dev/null"), "whole file", "character device", id="link-to-dev-null"),
    pytest.param(
        lambda d: write(d / "bad.xml", '<uniprot xmlns="http://uniprot.org/uniprot"><entry><accession>P1</accession>'),
        "entry #0 and rest of file",
        "ParseError",
        id="cut-xml",
    ),
]


@pytest.mark.parametrize(("make", "entry", "reason"), BAD_UNIPROT_INPUTS)
def test_a_bad_uniprot_input_is_reported_and_the_rest_read(tmp_path, make, entry, reason):
    folder = tmp_path / "uniprot"
    shutil.copy(UNIPROT / "P05067.dat", write(folder / "sub" / "P00698.json", json.dumps(P00698)).parent.parent)
    bad = make(folder)
    report = ReadReport()
    with deadline(20):
        entries = list(iter_entries(folder, report))
    assert sorted(e.accession for e in entries) == ["P00698", "P05067"]  # the sub-folder's entry too
    (problem,) = report.problems
    assert (problem.file, problem.entry) == (str(bad), entry) and reason in problem.reason, problem


def test_uniprot_dev_null_is_one_line_with_its_reason(tmp_path, capsys):
    code = build_dataset_module.main(["--uniprot", "/dev/null", *BUILD, "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert_one_error_line(code, error, ["no readable entry", "1 problems reported"])
    assert "skipped /dev/null [whole file]: a character device, not a regular file" in error


# (make a bad structure file in the structures folder, what the report says)
BAD_STRUCTURES = [
    pytest.param(
        lambda d: write(
            d / "AF-P05067-F1.pdb.gz", gzip.compress((STRUCTURES / "biotite__1aki.pdb").read_bytes())[:900]
        ),
        "EOFError",
        id="example-corrupt-pdb-gz",
    ),
    pytest.param(lambda d: write(d / "x.cif.gz", b"\x1f\x8b\x08\x00garbage"), "not indexed", id="corrupt-cif-gz"),
    pytest.param(lambda d: write(d / "empty.cif", ""), "the structure file is empty", id="empty-cif"),
    pytest.param(lambda d: write(d / "bin.cif", bytes(range(256))), "binary content", id="binary-cif"),
    pytest.param(lambda d: fifo(d / "pipe.pdb"), "a named pipe", id="named-pipe"),
    pytest.param(lambda d: link(d / "gone.pdb", "nowhere.pdb"), "broken symbolic link", id="dangling-link"),
    pytest.param(lambda d: link(d / "loop.cif", "loop.cif"), "symbolic link loop", id="link-loop"),
]


@pytest.mark.parametrize(("make", "reason"), BAD_STRUCTURES)
def test_a_bad_structure_file_is_reported_and_the_build_goes_on(tmp_path, make, reason):
    structures = tmp_path / "structures"
    shutil.copy(STRUCTURES / "biotite__1aki.pdb", write(structures / "README", "").parent)
    bad = make(structures)
    uniprot = [str(UNIPROT / "P05067.dat"), str(UNIPROT / "P00698.json.gz")]
    with deadline(60):
        result = build_dataset(
            BuildArguments(output_dir=str(tmp_path / "out"), uniprot=uniprot, structures=str(structures))
        )
    assert result.statistics.with_structure.total() == 1  # lysozyme, from 1AKI
    problems = [p for p in result.report.problems if p.file == str(bad)]
    assert len(problems) == 1 and reason in problems[0].reason, result.report.problems


def test_push_to_hub_offline_is_refused_before_building(tmp_path, capsys, monkeypatch):
    argv = ["--uniprot", str(UNIPROT / "P05067.dat"), *BUILD, "--output_dir", str(tmp_path / "out")]
    code = build_dataset_module.main([*argv, "--push_to_hub", "me/sepit-data"])
    assert_one_error_line(code, capsys.readouterr().err, ["push_to_hub: HF_HUB_OFFLINE=1", "push the folder later"])
    code = build_dataset_module.main([*argv, "--push_to_hub", "not a repo id!"])
    assert_one_error_line(code, capsys.readouterr().err, ["push_to_hub: not a repo id! is not a Hub repo id"])
    assert not (tmp_path / "out").exists()


# --- class 5: odd values in UniProt entries --------------------------------------------------------------------------

_FLAT = (UNIPROT / "P05067.dat").read_text()
_XML = (OLD / "biopython__Q13639.xml").read_text()


def flat_file(text: str) -> Callable[[Path], Path]:
    return lambda d: write(d / "entry.dat", text)


def xml_file(text: str) -> Callable[[Path], Path]:
    return lambda d: write(d / "entry.xml", text)


def json_with(**members: object) -> Callable[[Path], Path]:
    return lambda d: json_file(d / "entry.json", {**P00698, **members})


FUNCTION = [{"commentType": "FUNCTION", "texts": [{"value": "Binds <protein> and cleaves it."}]}]
# (make a file with one odd entry, what its reason says); the good entries beside it are written as read
ODD_VALUES = [
    pytest.param(
        json_with(primaryAccession=750), "primaryAccession: expected a string, got int 750", id="example-int-accession"
    ),
    pytest.param(json_with(primaryAccession=""), "accession: '' is not an accession", id="empty-accession"),
    pytest.param(json_with(primaryAccession="P0 0750"), "accession: 'P0 0750'", id="accession-with-a-space"),
    pytest.param(
        json_with(primaryAccession=None), "primaryAccession: expected a string, got null", id="null-accession"
    ),
    pytest.param(json_with(comments=FUNCTION), "function: holds '<protein>'", id="example-protein-tag-in-function"),
    pytest.param(json_with(keywords=[{"name": "<protein>"}]), "keywords: holds '<protein>'", id="protein-tag-keyword"),
    pytest.param(json_with(sequence={"value": 5}), "sequence.value: expected a string, got int 5", id="int-sequence"),
    pytest.param(json_with(sequence={"value": "MKT1"}), "sequence: invalid amino-acid letters ('1' at 3", id="digit"),
    pytest.param(json_with(comments="none"), "comments: expected an array, got str", id="comments-a-string"),
    pytest.param(
        json_with(organism={"scientificName": ["Gallus"]}),
        "organism.scientificName: expected a string",
        id="list-organism",
    ),
    pytest.param(
        json_with(comments=[{"commentType": "FUNCTION", "texts": [{"value": 3.5}]}]),
        "comments[0].texts[0].value: expected a string, got float 3.5",
        id="float-comment-text",
    ),
    pytest.param(
        flat_file(_FLAT.replace("CC   -!- FUNCTION: ", "CC   -!- FUNCTION: Binds <protein>. ", 1)),
        "function: holds '<protein>'",
        id="protein-tag-in-a-flat-comment",
    ),
    pytest.param(flat_file(_FLAT.replace("AC   P05067;", "AC   ;", 1)), "accession: ''", id="flat-empty-AC"),
    pytest.param(
        xml_file(re.sub(r'(<comment type="function">\s*<text[^>]*>)', r"\1Binds &lt;protein&gt;. ", _XML, count=1)),
        "function: holds '<protein>'",
        id="protein-tag-in-xml",
    ),
    pytest.param(
        xml_file(re.sub(r"<accession>Q13639</accession>", "<accession></accession>", _XML)),
        "accession: missing or empty",
        id="xml-empty-accession",
    ),
    pytest.param(
        xml_file(re.sub(r'<begin position="\d+"', '<begin position="one"', _XML, count=1)),
        "feature (chain): ValueError: invalid literal for int()",
        id="xml-position-not-a-number",
    ),
]


@pytest.mark.parametrize(("make", "reason"), ODD_VALUES)
def test_odd_values_are_reported_with_their_field_and_never_reach_the_dataset(tmp_path, make, reason):
    uniprot = tmp_path / "uniprot"
    json_file(uniprot / "good.json", annotated("P00001", SEQUENCES[1]), annotated("P00002", SEQUENCES[2]))
    bad = make(uniprot)
    result = build_dataset(BuildArguments(output_dir=str(tmp_path / "out"), uniprot=[str(uniprot)], structures="none"))
    problems = [p for p in result.report.problems if p.file == str(bad)]
    assert len(problems) == 1 and reason in problems[0].reason, result.report.problems
    for config in ("captions", "instructions"):
        rows = load_dataset(str(tmp_path / "out"), config, cache_dir=str(tmp_path / "cache"))
        accessions = {row["accession"] for split in rows.values() for row in split}
        assert accessions == {"P00001", "P00002"}  # plain strings: not '"P00001"'
        answers = [m["content"] for split in rows.values() for row in split for m in row["messages"][1::2]]
        assert answers and not any("<protein>" in answer for answer in answers)


# --- class 8: files that are not files -------------------------------------------------------------------------------


def unix_socket(path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return path


# (make the path, what the ValueError says)
NOT_FILES = [
    pytest.param(
        lambda d: fifo(d / "pipe.pdb"), ["pipe.pdb: a named pipe, not a regular file"], id="example-named-pipe"
    ),
    pytest.param(
        lambda d: link(d / "loop.pdb", "loop.pdb"), ["loop.pdb: a symbolic link loop"], id="example-link-loop"
    ),
    pytest.param(
        lambda d: link(d / "gone.cif", "nowhere.cif"), ["broken symbolic link (to nowhere.cif"], id="dangling"
    ),
    pytest.param(lambda d: link(d / "null.pdb", "/dev/null"), ["null.pdb: a character device"], id="link-to-dev-null"),
    pytest.param(lambda d: link(d / "zero.pdb.gz", "/dev/zero"), ["a character device"], id="dev-zero-gz"),
    pytest.param(lambda d: unix_socket(d / "s.pdb"), ["s.pdb: a socket, not a regular file"], id="socket"),
    pytest.param(lambda d: (d / "x.cif").mkdir() or d / "x.cif", ["is a directory"], id="folder-named-cif"),
    pytest.param(
        lambda d: write(d / "bomb.pdb.gz", gzip.compress(b"REMARK" + b" " * (3 << 20))),
        ["more than 1 MiB of structure text", "extract the chain"],
        id="example-gzip-bomb",
    ),
    pytest.param(
        lambda d: write(d / "huge.cif", "#" * (2 << 20)),
        ["more than 1 MiB", "MAX_STRUCTURE_BYTES"],
        id="huge-plain-file",
    ),
]


@pytest.mark.parametrize(("make", "fragments"), NOT_FILES)
def test_files_that_are_not_files_are_refused_without_blocking(tmp_path, monkeypatch, make, fragments):
    monkeypatch.setattr(structure_loading, "MAX_STRUCTURE_BYTES", 1 << 20)  # the cap, scaled down for the test
    path = make(tmp_path)
    with deadline(20), pytest.raises(ValueError) as info:
        load_structure(path)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


# (file, chain, how the byte-order mark is added)
BOMS = [
    pytest.param("biotite__1aki.cif", "A", lambda data: b"\xef\xbb\xbf" + data, id="example-bom-before-mmcif"),
    pytest.param("biotite__1aki.pdb", "A", lambda data: b"\xef\xbb\xbf" + data, id="bom-before-pdb"),
    pytest.param("biopython__2BEG.cif", "B", lambda data: gzip.compress(b"\xef\xbb\xbf" + data), id="bom-in-cif-gz"),
    pytest.param(
        "biopython__1LCD.cif", "A", lambda data: b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"), id="bom-crlf"
    ),
    pytest.param("graphein__AF-P04629-F1__P04629.pdb", None, lambda data: b"\xef\xbb\xbf" + data, id="bom-alphafold"),
]


@pytest.mark.parametrize(("name", "chain", "spoil"), BOMS)
def test_a_byte_order_mark_changes_nothing(tmp_path, name, chain, spoil):
    source = STRUCTURES / name
    suffix = "".join(source.suffixes) + (".gz" if spoil(b"x")[:2] == b"\x1f\x8b" else "")
    marked = load_structure(write(tmp_path / f"marked{suffix}", spoil(source.read_bytes())), chain)
    plain = load_structure(source, chain)
    assert marked.sequence == plain.sequence and marked.chain == plain.chain
    assert np.array_equal(marked.coords, plain.coords, equal_nan=True)


# --- class 9: command-line arguments refused late --------------------------------------------------------------------


@pytest.fixture
def datasets(tmp_path, small_dataset) -> dict[str, str]:
    """Copies of a good dataset with one thing wrong each."""
    folders = {name: tmp_path / name for name in ("script", "deleted", "empty-split")}
    for folder in folders.values():
        shutil.copytree(small_dataset, folder)
    write(folders["script"] / "script.py", "import datasets  # a loading script of datasets < 4\n")
    (folders["deleted"] / "instructions" / "train-00000-of-00001.parquet").unlink()
    card = (folders["empty-split"] / "README.md").read_text()
    card = re.sub(r"(- name: validation\n\s+num_bytes: )\d+(\n\s+num_examples: )\d+", r"\g<1>0\g<2>0", card)
    (folders["empty-split"] / "README.md").write_text(card)  # what builds before issue 13 declared
    return {name: str(folder) for name, folder in folders.items()}


@pytest.fixture
def pickled_model(tmp_path, converted) -> str:
    """The converted model with its weights as a legacy (non-zip) pickle that holds an object, not only tensors."""
    folder = tmp_path / "pickled"
    shutil.copytree(converted, folder)
    (folder / "model.safetensors").unlink()
    torch.save(
        {"weight": torch.ones(1), "obj": io.StringIO},
        folder / "pytorch_model.bin",
        _use_new_zipfile_serialization=False,
    )
    return str(folder)


EVALUATE = ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--bertscore_model", "none"]
EVAL_DATA = [*EVALUATE, "--dataset_name", "{dataset}"]
TRAIN = ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--use_cpu", "true", "--report_to", "none"]
TRAIN_DATA = [*TRAIN, "--dataset_name", "{dataset}"]

# (command, arguments, what the one line says)
CLI_CASES = [
    pytest.param(
        "evaluate",
        [*EVAL_DATA, "--dataset_config", "captions"],
        ["dataset_config: captions", "evaluate the 'instructions' config"],
        id="example-evaluate-captions",
    ),
    pytest.param(
        "evaluate", [*EVAL_DATA, "--device", "cuda:99"], ["device: cuda:99"], id="example-device-cuda-without-that-gpu"
    ),
    pytest.param(
        "evaluate", [*EVAL_DATA, "--device", "banana"], ["device: 'banana' is not a device"], id="device-banana"
    ),
    pytest.param(
        "evaluate", [*EVAL_DATA, "--split", "nosuch"], ["Unknown split", "nosuch"], id="evaluate-unknown-split"
    ),
    pytest.param(
        "evaluate",
        [*EVALUATE, "--dataset_name", "{script}"],
        ["holds a loading script (script.py)"],
        id="evaluate-loading-script",
    ),
    pytest.param(
        "evaluate",
        [*EVALUATE, "--dataset_name", "{deleted}"],
        ["'train' split", "none of its data files"],
        id="evaluate-deleted-split-file",
    ),
    pytest.param(
        "evaluate",
        [*EVAL_DATA, "--external_benchmarks", "{deleted}"],
        ["external_benchmarks: ", "none of its data files"],
        id="evaluate-external-deleted-file",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{pickled}", "--output_dir", "{out}"],
        ["pytorch_model.bin: not a plain tensor checkpoint"],
        id="example-legacy-pickle",
    ),
    pytest.param(
        "sft",
        [*TRAIN_DATA, "--resume_from_checkpoint", "{tmp}/gone"],
        ["resume_from_checkpoint: ", "gone does not exist"],
        id="example-resume-missing-folder",
    ),
    pytest.param(
        "sft",
        [*TRAIN_DATA, "--resume_from_checkpoint", "true"],
        ["resume_from_checkpoint: true", "no checkpoint-N"],
        id="resume-true-without-checkpoint",
    ),
    pytest.param(
        "sft",
        [*TRAIN_DATA, "--resume_from_checkpoint", "{dataset}"],
        ["not a checkpoint folder"],
        id="resume-from-a-non-checkpoint",
    ),
    pytest.param(
        "sft",
        [*TRAIN_DATA, "--max_train_samples", "0"],
        ["max_train_samples must be >= 1"],
        id="example-max-train-samples-0",
    ),
    pytest.param(
        "sft",
        [*TRAIN_DATA, "--max_train_samples", "-3"],
        ["max_train_samples must be >= 1", "got -3"],
        id="max-train-samples-negative",
    ),
    pytest.param(
        "sft",
        [*TRAIN, "--dataset_name", "{deleted}"],
        ["dataset_name: ", "none of its data files"],
        id="example-deleted-split-file",
    ),
    pytest.param(
        "sft", [*TRAIN, "--dataset_name", "{script}"], ["dataset_name: ", "loading script"], id="example-loading-script"
    ),
    pytest.param(
        "sft",
        [*TRAIN, "--dataset_name", "{empty-split}"],
        ["'validation' split", "has no rows"],
        id="declared-empty-split",
    ),
    pytest.param(
        "sft", [*TRAIN_DATA, "--dataset_config", "nosuch"], ["config 'nosuch'", "cannot be loaded"], id="unknown-config"
    ),
    pytest.param(
        "lora",
        [*TRAIN_DATA, "--max_train_samples", "0"],
        ["max_train_samples must be >= 1"],
        id="lora-max-train-samples-0",
    ),
    pytest.param("lora", [*TRAIN, "--dataset_name", "{script}"], ["loading script"], id="lora-loading-script"),
    pytest.param(
        "stage0",
        [*TRAIN_DATA, "--resume_from_checkpoint", "{tmp}/gone"],
        ["resume_from_checkpoint"],
        id="stage0-resume-missing",
    ),
    pytest.param(
        "stage0",
        [*TRAIN, "--dataset_name", "{deleted}", "--dataset_config", "instructions"],
        ["none of its data files"],
        id="stage0-deleted-split-file",
    ),
    pytest.param(
        "main_job", ["--output_dir", "{out}", "--device", "cuda:99"], ["device: cuda:99"], id="main-job-device"
    ),
    pytest.param(
        "main_job",
        ["--output_dir", "{out}", "--push_model_repo", "me/model"],
        ["push_model_repo: HF_HUB_OFFLINE=1"],
        id="main-job-push-offline",
    ),
]


@pytest.mark.parametrize(("cli", "argv", "fragments"), CLI_CASES)
def test_late_refusals_come_first_as_one_line(
    clis, converted, small_dataset, datasets, pickled_model, tmp_path, monkeypatch, capsys, cli, argv, fragments
):
    paths = {"model": str(converted), "dataset": str(small_dataset), "pickled": pickled_model, **datasets}
    paths |= {"tmp": str(tmp_path), "out": str(tmp_path / "out")}
    code, error = run_cli(clis, cli, [arg.format(**paths) for arg in argv], monkeypatch, capsys)
    assert_one_error_line(code, error, [fragment.format(**paths) for fragment in fragments])
    assert not (tmp_path / "out").exists()  # nothing written


# --- property tests: random field types and values in entries --------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["", "<protein>", "MKT1", "P0 0750", "Binds <protein>."]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Hypothesis runs every example of a test in one call of it: the examples share this folder, not a tmp_path.
_MEMORY = Path(os.environ.get("TMPDIR", "/tmp")) / f"sepit-property-{os.getpid()}"
# Paths into the real P00698 entry: every member SEPIT reads (and one it does not)
JSON_PATHS = [
    ("primaryAccession",),
    ("uniProtkbId",),
    ("sequence",),
    ("sequence", "value"),
    ("organism",),
    ("organism", "scientificName"),
    ("organism", "commonName"),
    ("proteinDescription",),
    ("proteinDescription", "recommendedName"),
    ("proteinDescription", "recommendedName", "fullName"),
    ("proteinDescription", "recommendedName", "fullName", "value"),
    ("proteinDescription", "recommendedName", "ecNumbers"),
    ("comments",),
    ("comments", 0),
    ("comments", 0, "commentType"),
    ("comments", 0, "texts"),
    ("comments", 0, "texts", 0, "value"),
    ("features",),
    ("features", 0, "type"),
    ("features", 0, "description"),
    ("keywords",),
    ("keywords", 0, "name"),
    ("uniProtKBCrossReferences",),
    ("uniProtKBCrossReferences", 0, "database"),
    ("references",),
]
FIELD = re.compile(r"^(?:ValueError: )?([\w.\[\]]+|entry): ")


def names_a_field(reason: str, keys: list[str]) -> bool:
    """The reason starts with a member path of the entry (or the entry field it fills) and a colon."""
    found = FIELD.match(reason)
    return found is not None and (
        any(key in found.group(1) for key in keys)
        or found.group(1) in {"entry", "accession", "sequence"}
        or "<protein>" in reason
    )


def set_member(entry: dict, path: tuple, value: object) -> None:
    parent = entry
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(JSON_PATHS), value=JSON_VALUES)
def test_random_json_members_are_read_or_named(path, value):
    entry = copy.deepcopy(P00698)
    set_member(entry, path, value)
    try:
        entry_from_json(entry)
    except ValueError as error:
        assert names_a_field(f"{error}", [str(key) for key in path]), (path, value, str(error))
    report = ReadReport()
    entries = list(iter_entries(write(_MEMORY / "entry.json", json.dumps({"results": [entry, P00698]})), report))
    assert entries[-1].accession == "P00698" and len(entries) + len(report.problems) == 2
    assert all(names_a_field(problem.reason, [str(key) for key in path]) for problem in report.problems)


XML_TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn")), max_size=15),
    st.sampled_from(["", "<protein>", "12", "-5", "P0 0750", "x" * 50]),
)
# (XPath below the entry, attribute or None for the element's text)
XML_SPOTS = [
    ("accession", None),
    ("name", None),
    ("protein/recommendedName/fullName", None),
    ("organism/name", None),
    ("organism/name", "type"),
    ("comment[@type='function']/text", None),
    ("comment[@type='subcellular location']/subcellularLocation/location", None),
    ("dbReference[@type='GO']/property[@type='term']", "value"),
    ("keyword", None),
    ("feature", "type"),
    ("feature/location/begin", "position"),
    ("feature/location/end", "position"),
    ("sequence", None),
]
XML_FIELD = re.compile(r"^(?:ValueError: )?([\w ()-]+): ")


@settings(max_examples=150, deadline=None)
@given(spot=st.sampled_from(XML_SPOTS), value=XML_TEXTS, remove=st.booleans())
def test_random_xml_values_are_read_or_named(spot, value, remove):
    tree = ElementTree.ElementTree(ElementTree.fromstring(_XML))
    element = tree.getroot().find(f"{NS}entry/" + "/".join(f"{NS}{step}" for step in spot[0].split("/")))
    assert element is not None, spot
    if spot[1] and remove:
        element.attrib.pop(spot[1], None)
    elif spot[1]:
        element.set(spot[1], value)
    else:
        element.text = value
    report = ReadReport()
    path = write(_MEMORY / "entry.xml", ElementTree.tostring(tree.getroot(), encoding="unicode"))
    entries = list(iter_entries(path, report))
    assert len(entries) + len(report.problems) == 1
    for problem in report.problems:
        assert XML_FIELD.match(problem.reason) and problem.entry != "entry #0 and rest of file", problem


FLAT_TEXTS = st.text(st.characters(min_codepoint=32, max_codepoint=0x24F, blacklist_categories=("Cs",)), max_size=40)
# Lines of the real P05067 entry that SEPIT reads: the value after the line code is replaced
FLAT_LINES = [
    "AC   ",
    "DE   RecName: Full=",
    "OS   ",
    "CC   -!- FUNCTION: ",
    "KW   ",
    "DR   GO; GO:0005576; C:",
    'FT                   /note="',
    "     ",
]


@settings(max_examples=150, deadline=None)
@given(
    start=st.sampled_from(FLAT_LINES),
    value=FLAT_TEXTS,
    extra=st.sampled_from(["", "ZZ   junk\n", "GN   A OR B.\n", "DT   01-JAN-1990 (Rel. 13, Created)\n"]),
)
def test_random_flat_values_are_read_or_named(start, value, extra):
    lines = _FLAT.splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith(start))
    lines[index] = start + value + "\n"
    lines.insert(2, extra)
    report = ReadReport()
    entries = list(iter_entries(write(_MEMORY / "entry.dat", "".join(lines)), report))
    assert len(entries) + len(report.problems) == 1
    for problem in report.problems:
        assert re.match(r"^([A-Z*/]{2} line|sequence line|line|ValueError: [a-z_]+:)", problem.reason), problem
    if extra.startswith("ZZ"):
        assert report.problems and report.problems[0].reason.startswith("ZZ line 'ZZ   junk'")
