"""Faults (issues 8 and 13): a process SIGKILLed while it writes the dataset, a model folder, the converter's output or
the evaluation reports leaves the previous complete version readable, and the next write succeeds and removes what the
killed one left behind.

Every writer goes through `modeling_sepit.atomic_folder`: a staging folder `.<name>.<random>` beside the target, renamed
into place when complete. A SIGKILL skips every clean-up, so the staging folder stays; each writer holds a `flock` on
its own (the kernel drops it when the process dies), and the next write of the same target removes those nobody holds.
The kill is made to land mid-write deterministically: the child's writer (`ParquetWriter.write`, safetensors'
`save_file`, the evaluation's `write_report`) is wrapped to stop, half done, until it is killed.

Checkpoints written during training are covered where training is: tests/training/test_sft.py and
test_stage0_encoder_warmup.py (`test_killed_run_resumes_to_the_same_weights`: SIGKILL after a checkpoint, resume to
the same weights; `test_a_checkpoint_interrupted_while_written_never_becomes_the_last_one`).
"""

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoProcessor

from dataset_card import build_dataset as build_dataset_module
from dataset_card.build_dataset import BuildArguments, build_dataset
from dataset_card.external_benchmarks import main as external_benchmarks_main
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.atomic_folder import MARKER, _remove_leftovers, atomic_folder
from modeling_sepit.convert_original_sepit import convert
from modeling_sepit.convert_original_sepit import main as converter_main
from modeling_sepit.hub_sepit import save_hub_folder
from tests.conftest import ORIGINAL, ROOT

UNIPROT = ROOT / "tests" / "fixtures" / "uniprot"
OLD = ROOT / "tests" / "fixtures" / "uniprot_old"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def leftovers(target: Path) -> list[Path]:
    return sorted(path for path in target.parent.iterdir() if path.name.startswith(f".{target.name}."))


def kill_when(process: subprocess.Popen, marker: Path, target: Path) -> Path:
    """Wait until the child is stopped mid-write (it touched `marker`), check that a live writer's staging folder
    survives another writer's clean-up, then SIGKILL the child; return its staging folder."""
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, f"the writer ended before the kill: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.05)
    (staging,) = leftovers(target)
    _remove_leftovers(target)  # what the next write does first: the live writer's folder is locked, so it stays
    assert staging.is_dir()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert leftovers(target) == [staging]  # a SIGKILL leaves it behind
    return staging


# --- the dataset -----------------------------------------------------------------------------------------------------

SLOW_BUILD = textwrap.dedent(
    """
    import runpy, sys, time
    from pathlib import Path
    from datasets.arrow_writer import ParquetWriter
    marker = Path(sys.argv.pop(1))
    write = ParquetWriter.write
    def stalled_write(self, *args, **kwargs):
        write(self, *args, **kwargs)
        marker.touch()  # the first rows are in the staging folder: the kill lands here
        time.sleep(600)
    ParquetWriter.write = stalled_write
    runpy.run_module("dataset_card.build_dataset", run_name="__main__", alter_sys=True)  # python -m ...
    """
)


def instructions(folder: Path, cache: Path) -> list[dict]:
    return load_dataset(str(folder), "instructions", split="train", cache_dir=str(cache)).to_list()


def test_dataset_build_killed_while_writing_keeps_the_previous_dataset(tmp_path):
    target = tmp_path / "dataset"
    build_dataset(BuildArguments(output_dir=str(target), uniprot=[str(UNIPROT / "P05067.dat")], structures="none"))
    previous = instructions(target, tmp_path / "cache-0")
    assert {row["accession"] for row in previous} == {"P05067"}

    argv = ["--output_dir", str(target), "--uniprot", str(UNIPROT / "P05067.dat"), str(UNIPROT / "P00698.json.gz")]
    argv += ["--structures", "none", "--seed", "1"]
    marker = tmp_path / "writing"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILD, str(marker), *argv],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    staging = kill_when(process, marker, target)
    assert (staging / "instructions").is_dir()  # killed in pass 2, with the Parquet writers open

    assert instructions(target, tmp_path / "cache-1") == previous  # the previous complete version, unchanged
    assert build_dataset_module.main(argv) == 0  # the rerun
    rows = instructions(target, tmp_path / "cache-2")
    assert {row["accession"] for row in rows} == {"P05067", "P00698"}
    assert leftovers(target) == []  # the killed build's staging folder was removed (before the fix: kept forever)


# --- a model folder --------------------------------------------------------------------------------------------------

SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import safetensors.torch
    converted, hub, marker = sys.argv[1:]
    save_file = safetensors.torch.save_file
    def torn_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # half of the weights are on disk ...
        Path(marker).touch()
        time.sleep(600)  # ... when the kill comes
    safetensors.torch.save_file = torn_save_file  # before transformers imports it
    import torch
    from transformers import AutoProcessor
    from modeling_sepit import SepitForConditionalGeneration
    from modeling_sepit.hub_sepit import save_hub_folder
    model = SepitForConditionalGeneration.from_pretrained(converted)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    save_hub_folder(model, AutoProcessor.from_pretrained(converted), hub)
    """
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "converted"
    convert(ORIGINAL / "original-tiny-dense", folder, protein_padding_length=48)
    return folder


def test_model_save_killed_while_writing_keeps_the_previous_model(converted, tmp_path):
    hub = tmp_path / "hub"
    model = SepitForConditionalGeneration.from_pretrained(converted)
    processor = AutoProcessor.from_pretrained(converted)
    save_hub_folder(model, processor, hub)
    previous = load_file(hub / "model.safetensors")

    marker = tmp_path / "writing"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(converted), str(hub), str(marker)],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    staging = kill_when(process, marker, hub)
    torn = staging / "model.safetensors"
    assert 0 < torn.stat().st_size < (hub / "model.safetensors").stat().st_size  # killed mid-write

    reloaded = SepitForConditionalGeneration.from_pretrained(hub)  # the previous complete version
    state = reloaded.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in previous.items())
    assert isinstance(SepitProcessor.from_pretrained(hub), SepitProcessor)

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    save_hub_folder(model, processor, hub)  # the rerun
    saved = load_file(hub / "model.safetensors")
    changed = [name for name, _ in model.named_parameters() if name in previous]
    assert changed and all(torch.equal(saved[name], previous[name] + 1.0) for name in changed)
    assert leftovers(hub) == []


# --- the converter's output ------------------------------------------------------------------------------------------

SLOW_CONVERT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import safetensors.torch
    marker = Path(sys.argv.pop(1))
    save_file = safetensors.torch.save_file
    def torn_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # half of the weights are on disk ...
        marker.touch()
        time.sleep(600)  # ... when the kill comes
    safetensors.torch.save_file = torn_save_file  # before transformers imports it
    from modeling_sepit.convert_original_sepit import main
    sys.exit(main(sys.argv[1:]))
    """
)


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_conversion_killed_while_writing_keeps_the_previous_conversion(tmp_path):
    target = tmp_path / "converted"
    original = ORIGINAL / "original-tiny-moe-top1"
    argv = ["--input_dir", str(original), "--output_dir", str(target), "--protein_padding_length"]
    convert(original, target, protein_padding_length=48)
    previous = files(target)

    marker = tmp_path / "writing"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(marker), *argv, "64"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    staging = kill_when(process, marker, target)
    assert 0 < (staging / "model.safetensors").stat().st_size < len(previous["model.safetensors"])  # killed mid-write

    assert files(target) == previous  # the previous complete conversion, byte for byte
    assert SepitForConditionalGeneration.from_pretrained(target).config.num_experts == 4
    assert converter_main([*argv, "64"]) == 0  # the rerun replaces its own earlier output
    assert json.loads((target / "processor_config.json").read_text())["protein_padding_length"] == 64
    assert json.loads((target / MARKER).read_text()) == {"writer": "convert_original_sepit"}
    assert leftovers(target) == []


# --- the evaluation reports ------------------------------------------------------------------------------------------

SLOW_EVALUATE = textwrap.dedent(
    """
    import runpy, sys, time
    from pathlib import Path
    from modeling_sepit import metrics_sepit
    marker = Path(sys.argv.pop(1))
    write_report = metrics_sepit.write_report
    def stalled_write_report(*args, **kwargs):
        paths = write_report(*args, **kwargs)  # the first benchmark's report is in the staging folder ...
        marker.touch()
        time.sleep(600)  # ... when the kill comes
    metrics_sepit.write_report = stalled_write_report  # before evaluate.py imports it
    runpy.run_path("training/evaluate.py", run_name="__main__")
    """
)


def test_evaluation_killed_while_writing_keeps_the_previous_reports(converted, tmp_path, capsys):
    uniprot = [str(UNIPROT / "P05067.dat"), str(UNIPROT / "P00698.json.gz"), str(OLD / "biopython__swiss4.txt")]
    dataset = tmp_path / "dataset"
    build_dataset(
        BuildArguments(output_dir=str(dataset), uniprot=uniprot, structures="none", split_fractions=[0.5, 0, 0.5])
    )
    target = tmp_path / "evaluation"
    argv = ["--model_name_or_path", str(converted), "--dataset_name", str(dataset), "--output_dir", str(target)]
    argv += ["--max_samples", "2", "--max_new_tokens", "2", "--bertscore_model", "none", "--external_benchmarks"]
    external = tmp_path / "instructprotein"
    assert external_benchmarks_main(["--output_dir", str(external), "--max_per_benchmark", "2"]) == 0
    evaluate = runpy.run_path(str(ROOT / "training" / "evaluate.py"))["main"]
    assert evaluate([*argv, str(external)]) == 0
    previous = files(target)
    assert {"heldout/metrics.json", "instructprotein/predictions.jsonl", MARKER} <= previous.keys()

    marker = tmp_path / "writing"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_EVALUATE, str(marker), *argv, str(external), "--max_samples", "1"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    staging = kill_when(process, marker, target)
    assert (staging / "heldout" / "metrics.json").is_file()  # killed with one report written, one to go

    assert files(target) == previous  # both previous reports, byte for byte: never one new and one old
    assert evaluate([*argv, str(external), "--max_samples", "1"]) == 0  # the rerun
    assert json.loads((target / "heldout" / "metrics.json").read_text())["sepit"]["overall"]["n"] == 1
    assert leftovers(target) == []
    capsys.readouterr()


# --- the clean-up rule -----------------------------------------------------------------------------------------------


def test_only_unlocked_leftovers_of_the_same_target_are_removed(tmp_path):
    target = tmp_path / "model"
    stale = tmp_path / ".model.k1ll3d_x"  # a staging folder of a writer that died: nobody holds its lock
    (stale / "half").mkdir(parents=True)
    others = [tmp_path / name for name in (".model.v2.abcd1234", ".other.abcd1234", ".model-v2.abcd1234", ".modelx")]
    for other in others:  # another target's staging folders (".model.v2" is the one of "model.v2"), or no staging
        other.mkdir()
    with atomic_folder(target) as outer:  # a live writer ...
        assert not stale.exists()
        (outer / "who").write_text("outer")
        with atomic_folder(target) as inner:  # ... whose folder a second writer's clean-up must leave alone
            (inner / "who").write_text("inner")
        assert outer.is_dir() and (target / "who").read_text() == "inner"
    assert (target / "who").read_text() == "outer"
    assert all(other.is_dir() for other in others)
    assert leftovers(target) == [others[0]]


def test_a_writer_killed_between_its_renames_gets_the_previous_folder_back(tmp_path):
    """Between `folder -> .folder.old.x/folder` and `staging -> folder` the target is briefly missing; a writer killed
    there leaves the previous version in `.folder.old.x`: the next write puts it back before it starts."""
    target = tmp_path / "dataset"
    retired = tmp_path / ".dataset.old.abcd1234"
    (retired / "dataset").mkdir(parents=True)
    (retired / "dataset" / "README.md").write_text("previous")
    (tmp_path / ".dataset.efgh5678").mkdir()  # the killed writer's complete staging folder: removed, not published
    with atomic_folder(target) as staging:
        assert (target / "README.md").read_text() == "previous"  # readable again while the new one is written
        (staging / "README.md").write_text("new")
    assert (target / "README.md").read_text() == "new" and leftovers(target) == []


def test_a_failed_write_keeps_the_previous_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "dataset"
    with atomic_folder(target) as staging:
        (staging / "README.md").write_text("previous")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(target) as staging:
        (staging / "README.md").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "README.md").read_text() == "previous" and leftovers(target) == []
