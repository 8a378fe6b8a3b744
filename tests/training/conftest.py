"""Inputs shared by the training-script tests, built once per session: a small real dataset (the bundled UniProt store
plus the test fixtures, with structures for P00698 and P05067) and tiny parts whose text tokenizer is trained on it."""

import runpy
from pathlib import Path

import pytest

from dataset_card.build_dataset import BuildArguments, build_dataset

ROOT = Path(__file__).resolve().parents[2]


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
