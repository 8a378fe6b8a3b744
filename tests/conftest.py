"""Shared test helpers: tiny SEPIT configs, real proteins (sequence + C-alpha coordinates) from PDB files, and, built
once per session, a small real dataset (the bundled UniProt store plus the test fixtures, with structures for P00698
and P05067) with tiny parts whose text tokenizer is trained on it."""

import configparser
import importlib
import io
import os
import re
import runpy
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import biotite.structure as struc
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import pytest
import torch
from biotite.sequence import ProteinSequence
from transformers import AutoTokenizer, EsmConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataset_card.build_dataset import BuildArguments, build_dataset  # noqa: E402
from modeling_sepit import SepitConfig, SepitForConditionalGeneration, SepitProcessor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
ORIGINAL = FIXTURES / "sepit-original"
STRUCTURES = FIXTURES / "structures"
PROTEIN_TOKEN_ID = 99
# The command-line scripts (run with `runpy.run_path`), by the names the CLI tests give them.
SCRIPTS = {
    "evaluate": ROOT / "training" / "evaluate.py",
    "main_job": ROOT / "examples" / "main_job.py",
    "sft": ROOT / "training" / "sft.py",
    "stage0": ROOT / "training" / "stage0_encoder_warmup.py",
    "lora": ROOT / "training" / "finetune_lora.py",
    "pure_llm": ROOT / "training" / "pure_llm.py",
}
PAD_ID = 0
# Console scripts by name -> "module:function", as setup.cfg declares them (installed or not).
_SETUP = configparser.ConfigParser()
_SETUP.read(ROOT / "setup.cfg")
CONSOLE_SCRIPTS = dict(
    line.replace(" ", "").split("=") for line in _SETUP["options.entry_points"]["console_scripts"].split("\n") if line
)


def command_lines() -> dict[str, list[str]]:
    """Every command line of the project, found rather than listed (a new script is covered at once): the scripts in
    training/, examples/ and benchmarks/ (`python <script>`), the package modules with a `__main__` guard (`python -m
    <module>`) and the console scripts, each as the argv that `run_command_line` takes."""
    main_guard = re.compile(r'^if __name__ == "__main__":', re.MULTILINE)
    found = {}
    for folder in ("training", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            found[f"{folder}/{path.name}"] = [f"{folder}/{path.name}"]
    for package in ("modeling_sepit", "dataset_card"):
        for path in sorted((ROOT / package).glob("*.py")):
            if main_guard.search(path.read_text(encoding="utf-8")):
                found[f"-m {package}.{path.stem}"] = ["-m", f"{package}.{path.stem}"]
    return found | {name: [name] for name in CONSOLE_SCRIPTS}


def run_command_line(argv: list[str]) -> tuple[int, str, str]:
    """Run `python argv...` (`argv[0]` a script under the repository root, `-m module`, or a console script's name)
    in this process, as its `__main__`: exit code, stdout, stderr. In-process, so the imports are paid once."""
    stdout, stderr, saved_argv = io.StringIO(), io.StringIO(), sys.argv
    code = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings():
            # runpy warns that an imported module is run again as __main__: that is the point here.
            warnings.simplefilter("ignore", RuntimeWarning)
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            elif argv[0].endswith(".py"):
                sys.argv = [str(ROOT / argv[0]), *argv[1:]]
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            else:
                module, function = CONSOLE_SCRIPTS[argv[0]].split(":")
                sys.argv = list(argv)
                code = getattr(importlib.import_module(module), function)() or 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    finally:
        sys.argv = saved_argv
    return code, stdout.getvalue(), stderr.getvalue()


def read_chain(path: Path, chain: str) -> tuple[str, torch.Tensor]:
    """Sequence and C-alpha coordinates of one chain (first model) of a real structure file."""
    if path.suffix == ".cif":
        atoms = pdbx.get_structure(pdbx.CIFFile.read(path), model=1)
    else:
        atoms = pdb.PDBFile.read(path).get_structure(model=1)
    ca = atoms[(atoms.atom_name == "CA") & struc.filter_amino_acids(atoms) & (atoms.chain_id == chain)]
    sequence = "".join(ProteinSequence.convert_letter_3to1(name) for name in ca.res_name)
    return sequence, torch.tensor(ca.coord, dtype=torch.float32)


@pytest.fixture(scope="session")
def real_proteins() -> list[tuple[str, torch.Tensor]]:
    """Lysozyme (1AKI, 129 aa), lac repressor headpiece (1LCD, 51 aa), amyloid-beta 17-42 (2BEG chain A, 26 aa)."""
    return [
        read_chain(STRUCTURES / "biotite__1aki.pdb", "A"),
        read_chain(STRUCTURES / "biopython__1LCD.pdb", "A"),
        read_chain(STRUCTURES / "biopython__2BEG.cif", "A"),
    ]


@pytest.fixture(scope="session")
def protein_tokenizer():
    return AutoTokenizer.from_pretrained(ORIGINAL / "original-tiny-dense" / "protein_tokenizer")


def tiny_config(**overrides) -> SepitConfig:
    protein_config = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        position_embedding_type="rotary",
        pad_token_id=1,
        mask_token_id=32,
        token_dropout=True,
        emb_layer_norm_before=False,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    text_config = dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=100,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs = dict(protein_config=protein_config, text_config=text_config, protein_token_id=PROTEIN_TOKEN_ID)
    kwargs["num_gaussian_kernels"] = 16
    kwargs.update(overrides)
    return SepitConfig(**kwargs)


def protein_batch(proteins: list[tuple[str, torch.Tensor]], tokenizer, with_coords: bool = True) -> dict:
    """Protein tensors for the model: tokens with <cls>/<eos>, coordinates aligned to them (NaN where absent)."""
    encoded = tokenizer([sequence for sequence, _ in proteins], padding=True, return_tensors="pt")
    batch = {"protein_input_ids": encoded.input_ids, "protein_attention_mask": encoded.attention_mask}
    if with_coords:
        length = encoded.input_ids.shape[1]
        coords = torch.full((len(proteins), length, 3), float("nan"))
        for i, (sequence, ca) in enumerate(proteins):
            coords[i, 1 : 1 + len(sequence)] = ca
        batch["protein_coords"] = coords
        batch["protein_coords_mask"] = torch.isfinite(coords).all(-1)
    return batch


def prompt_ids(feature_counts: list[int], seed: int = 0) -> list[list[int]]:
    """One prompt per protein: a few text tokens, the expanded `<protein>` run, a few more text tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for count in feature_counts:
        before = torch.randint(
            3, PROTEIN_TOKEN_ID, (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator
        )
        after = torch.randint(
            3, PROTEIN_TOKEN_ID, (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator
        )
        prompts.append([1, *before.tolist(), *[PROTEIN_TOKEN_ID] * count, *after.tolist()])
    return prompts


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def run_in_fresh_python(script: str, args: list[str], workdir: Path) -> str:
    """Run `script` in a new interpreter that cannot import this project (only saved folders' remote code); return
    its stdout, failing the test with its stderr if it fails."""
    path = workdir / "fresh_process_check.py"
    path.write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(path), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("training-data") / "dataset"
    sources = [
        str(ROOT / "dataset_card" / "data" / "uniprot" / "uniprot_flat_store"),
        str(ROOT / "tests/fixtures/uniprot"),
    ]
    build_dataset(BuildArguments(output_dir=str(output), uniprot=sources))
    return output


@pytest.fixture(scope="session")
def tiny_parts(demo_dataset, tmp_path_factory) -> Path:
    """protein_model/, language_model/ and text_encoder/ folders (`training/build_tiny_parts.py`)."""
    builder = runpy.run_path(str(ROOT / "training" / "build_tiny_parts.py"))
    output = tmp_path_factory.mktemp("training-parts") / "parts"
    arguments = builder["TinyPartsArguments"](dataset_dir=str(demo_dataset), output_dir=str(output), hidden_size=64)
    return builder["build_tiny_parts"](arguments)


@pytest.fixture(scope="module")
def model_and_processor(tiny_parts):
    """A SEPIT model from the tiny parts (projector seeded) and its processor, proteins cut at 64 residues."""
    processor = SepitProcessor.from_pretrained_parts(tiny_parts / "protein_model", tiny_parts / "language_model")
    processor.max_protein_length = 64
    torch.manual_seed(0)
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model", protein_token_id=processor.protein_token_id
    )
    return model.eval(), processor


@pytest.fixture(scope="module")
def saved_model(model_and_processor, tmp_path_factory) -> Path:
    """`model_and_processor` saved as one folder (the standard `save_pretrained` pair), for the command-line scripts."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    model, processor = model_and_processor
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
