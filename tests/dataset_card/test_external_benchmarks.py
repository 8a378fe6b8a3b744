"""InstructProtein's test sets as yes/no questions: every line read, answers from the labels, GO names from the bundled
UniProt entries, balanced seeded samples, and a Parquet split with the instruction Features."""

import json
import random
from collections import Counter

import pytest
from datasets import load_dataset

from dataset_card.build_dataset import FEATURES
from dataset_card.external_benchmarks import (
    GO_MF_FILE,
    GO_MF_TYPE,
    METAL_FILE,
    METAL_TYPE,
    ExternalBenchmarkArguments,
    balanced_sample,
    go_mf_rows,
    go_term_names,
    main,
    metal_ion_binding_rows,
)


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    return go_term_names(ExternalBenchmarkArguments(output_dir="unused").uniprot_dir)


def test_metal_ion_binding_reads_every_protein_with_its_label() -> None:
    rows = list(metal_ion_binding_rows())
    lines = METAL_FILE.read_text().splitlines()
    assert len(rows) == len(lines) == 1332
    assert Counter(row["answer"] for row in rows) == {"Yes": 666, "No": 666}
    first_sequence, _, first_label = lines[0].partition("\t")
    assert rows[0]["sequence"] == first_sequence and rows[0]["answer"] == ("Yes" if first_label == "1" else "No")
    assert {row["type"] for row in rows} == {METAL_TYPE}
    assert all(row["messages"][1]["content"] == row["answer"] for row in rows)


def test_go_names_come_from_the_bundled_entries(names) -> None:
    # e.g. P21802 (FGFR2) in the bundled flat files: "DR   GO; GO:0008201; F:heparin binding; ..."
    assert names["GO:0008201"] == "heparin binding"
    assert len(names) > 200 and all(term.startswith("GO:") and len(term) == 10 for term in names)


def test_go_questions_follow_labels_and_negative_labels(names) -> None:
    records = [json.loads(line) for line in GO_MF_FILE.read_text().splitlines()]
    expected = Counter()
    for record in records:
        expected["Yes"] += sum(term in names for term in record["label"])
        expected["No"] += sum(term in names for term in record["negative_labels"])
    rows = list(go_mf_rows(names))
    assert Counter(row["answer"] for row in rows) == expected and expected["Yes"] > 20 and expected["No"] > 20
    for row in rows:
        index = int(row["accession"].rsplit("-", 1)[1])
        record = records[index]
        term = row["question"].rsplit("(", 1)[1].rstrip(")?")
        assert row["sequence"] == record["sequence"] and names[term] in row["question"]
        assert term in (record["label"] if row["answer"] == "Yes" else record["negative_labels"])
        assert row["type"] == GO_MF_TYPE


def test_balanced_sample_is_seeded_and_half_yes() -> None:
    rows = list(metal_ion_binding_rows())
    first = balanced_sample(rows, 40, random.Random(0))
    assert Counter(row["answer"] for row in first) == {"Yes": 20, "No": 20}
    assert first == balanced_sample(rows, 40, random.Random(0))
    assert first != balanced_sample(rows, 40, random.Random(1))
    assert [row["accession"] for row in first] == sorted(row["accession"] for row in first)  # original order


def test_builder_writes_a_parquet_split_with_the_instruction_features(tmp_path) -> None:
    output = tmp_path / "instructprotein"
    assert main(["--output_dir", str(output), "--max_per_benchmark", "10"]) == 0
    dataset = load_dataset(str(output), split="test")
    assert dataset.features == FEATURES["instructions"]
    assert Counter(zip(dataset["type"], dataset["answer"], strict=True)) == {
        (METAL_TYPE, "Yes"): 5,
        (METAL_TYPE, "No"): 5,
        (GO_MF_TYPE, "Yes"): 5,
        (GO_MF_TYPE, "No"): 5,
    }
    assert all(question.count("<protein>") == 1 for question in dataset["question"])


def test_bad_arguments_and_lines_are_named(tmp_path, capsys) -> None:
    assert main(["--output_dir", str(tmp_path / "x"), "--max_per_benchmark", "1"]) == 2
    assert "max_per_benchmark must be at least 2" in capsys.readouterr().err
    broken = tmp_path / "metal.txt"
    broken.write_text("MKV\t1\nMKVL\tmaybe\n")
    with pytest.raises(ValueError, match=r"metal.txt:2: expected 'sequence<TAB>0\|1'"):
        list(metal_ion_binding_rows(broken))
    broken.write_text("MKV1\t1\n")
    with pytest.raises(ValueError, match="metal.txt:1"):
        list(metal_ion_binding_rows(broken))
