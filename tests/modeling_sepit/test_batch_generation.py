"""The generation loop: one encoder pass per distinct protein per batch (counted), answers equal to one-by-one ones and
in input order, a shard file cut mid-line by a kill resumed without regenerating what it holds, a rerun with other
settings refused, and both record formats (the original's scored by `training/score.py`)."""

import json
import runpy
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from modeling_sepit.batch_generation import (
    generate_in_batches,
    generate_streamed,
    original_records,
    prediction_records,
    write_jsonl,
)
from modeling_sepit.evaluation_sepit import SEPIT, generate_answers, system_requests

ROOT = Path(__file__).resolve().parents[2]
score = runpy.run_path(str(ROOT / "training" / "score.py"))


@pytest.fixture(scope="module")
def rows(demo_dataset) -> list[dict]:
    """Questions about two proteins, interleaved in input order: lysozyme (with its structure) three times, another
    protein twice."""
    train = load_dataset(str(demo_dataset), "instructions", split="train")
    lysozyme = [row for row in train if row["accession"] == "P00698"][:3]
    other = [row for row in train if row["accession"] != "P00698" and row["coords"] is None][:1]
    other += [row for row in train if row["accession"] == other[0]["accession"]][1:2]
    assert len(lysozyme) == 3 and len(other) == 2 and lysozyme[0]["coords"] is not None
    return [lysozyme[0], other[0], lysozyme[1], other[1], lysozyme[2]]


def counted_encoder(model, monkeypatch) -> list[int]:
    """The number of proteins each `get_protein_features` call encodes."""
    counts = []
    features = model.get_protein_features

    def counting(**inputs):
        counts.append(inputs["protein_input_ids"].shape[0])
        return features(**inputs)

    monkeypatch.setattr(model, "get_protein_features", counting)
    return counts


def test_the_encoder_runs_once_per_protein_per_batch(model_and_processor, rows, monkeypatch) -> None:
    model, processor = model_and_processor
    counts = counted_encoder(model, monkeypatch)
    batched = generate_answers(model, processor, rows, SEPIT, batch_size=8, max_new_tokens=6, progress=False)
    assert counts == [2]  # one batch, two distinct proteins, five questions
    counts.clear()
    one_by_one = generate_answers(model, processor, rows, SEPIT, batch_size=1, max_new_tokens=6, progress=False)
    assert counts == [1] * len(rows)
    assert batched == one_by_one and len(set(batched)) > 1


def test_a_killed_shard_resumes_without_regenerating_its_answers(
    model_and_processor, rows, tmp_path, monkeypatch
) -> None:
    model, processor = model_and_processor
    shards = tmp_path / "shards"
    expected = generate_answers(model, processor, rows, SEPIT, batch_size=2, max_new_tokens=6, progress=False)
    generate_answers(model, processor, rows, SEPIT, 2, 6, progress=False, shard_dir=shards)
    shard = shards / "rank-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(rows) and (shards / "settings.json").is_file()
    # As a kill leaves it: the first batch (two rows) written, the next cut mid-line.
    shard.write_bytes(b"".join(lines[:2]) + lines[2][:7])
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(len(kw["input_ids"])) or generate(**kw))
    resumed = generate_answers(model, processor, rows, SEPIT, 2, 6, progress=False, shard_dir=shards)
    assert resumed == expected and calls == [2, 1]  # the two batches not written, not the first
    records = [json.loads(line) for line in shard.read_bytes().splitlines()]
    assert sorted(record["index"] for record in records) == list(range(len(rows)))


def test_a_stream_is_answered_window_by_window_as_in_memory_and_resumes(
    model_and_processor, rows, tmp_path, monkeypatch
) -> None:
    model, processor = model_and_processor
    expected = generate_answers(model, processor, rows, SEPIT, batch_size=2, max_new_tokens=6, progress=False)
    stream = Dataset.from_list(rows).to_iterable_dataset()

    def requests_for(window: list[dict]) -> tuple[list, list]:
        return system_requests(model, processor, window, SEPIT)

    shards = tmp_path / "shards"
    answers = generate_streamed(
        model, processor, stream, requests_for, 2, 6, window=3, shard_dir=shards, progress=False
    )
    assert answers == dict(enumerate(expected))
    shard = shards / "rank-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    first_window = sorted(json.loads(line)["index"] for line in lines[:3])
    assert len(lines) == len(rows) and first_window == [0, 1, 2]  # rows 0-2, then 3-4
    # As a kill leaves it: the first window's first batch (two rows) written, its second cut mid-line.
    shard.write_bytes(b"".join(lines[:2]) + lines[2][:7])
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(len(kw["input_ids"])) or generate(**kw))
    resumed = generate_streamed(
        model, processor, stream, requests_for, 2, 6, window=3, shard_dir=shards, progress=False
    )
    assert resumed == answers and calls == [1, 2]  # the rest of the first window, then the second
    records = [json.loads(line) for line in shard.read_bytes().splitlines()]
    assert sorted(record["index"] for record in records) == list(range(len(rows)))


def test_a_rerun_with_other_settings_is_refused(model_and_processor, rows, tmp_path) -> None:
    model, processor = model_and_processor
    shards = tmp_path / "shards"
    generate_answers(model, processor, rows[:2], SEPIT, 2, 2, progress=False, shard_dir=shards)
    with pytest.raises(ValueError, match=r"shard_dir: .* other settings \(max_new_tokens 2 -> 3\)"):
        generate_answers(model, processor, rows[:2], SEPIT, 2, 3, progress=False, shard_dir=shards)
    with pytest.raises(ValueError, match=r"other settings \(questions_sha256 .*rows 2 -> 3"):
        generate_answers(model, processor, rows[:3], SEPIT, 2, 2, progress=False, shard_dir=shards)
    with pytest.raises(ValueError, match="sort_keys: 1 keys for 2 requests"):
        generate_in_batches(model, processor, [([], [])] * 2, [0])


def test_both_record_formats_and_the_original_one_scores(rows, tmp_path) -> None:
    answers = ["Yes", "It binds DNA.", "No", "A lysozyme.", "Unknown."]
    records = list(prediction_records(rows, {SEPIT: answers}))
    assert [record["question"] for record in records] == [row["question"] for row in rows]
    assert set(records[0]) == {"accession", "type", "question", "reference", SEPIT}
    assert [record[SEPIT] for record in records] == answers
    original = list(original_records(rows, answers))
    assert original[1] == {
        "id": rows[1]["accession"],
        "conversation": [
            {"role": "user", "content": rows[1]["question"]},
            {"role": "assistant", "content": rows[1]["answer"]},
        ],
        "response": "It binds DNA.",
    }
    path = tmp_path / "test_output.jsonl"
    write_jsonl(path, iter(original))
    argv = ["--predictions", str(path), "--output_dir", str(tmp_path / "scores"), "--bertscore_model", "none"]
    assert score["main"]([*argv, "--original_system", "sepit (generated)"]) == 0
    results = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert results["sepit (generated)"]["overall"]["n"] == len(rows)
