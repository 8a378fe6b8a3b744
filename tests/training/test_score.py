"""`training/score.py`: answers scored without a model, from this project's predictions.jsonl and from the original
SEPIT code's inference output (`{"id", "conversation", "response"}`, responses that echo the prompt), under both
protocols; unreadable records reported with their line and skipped; bad arguments exit 2 with one line."""

import json
import runpy
from pathlib import Path

import pytest

from modeling_sepit.metrics_sepit import default_bertscore_model, score_answers

ROOT = Path(__file__).resolve().parents[2]
score = runpy.run_path(str(ROOT / "training" / "score.py"))

QUESTION = "What is the function of <protein> ?"
ANSWER = "RNA-dependent RNA polymerase which is responsible for replication and transcription of virus RNA segments."
YES_NO = "Does the protein <protein> have the molecular function 'RNA binding'?"
# What the original's inference wrote: the decoded prompt (its special tokens skipped) followed by the answer.
SYSTEM_PROMPT = "You are a helpful assistant. "
PROJECT_RECORDS = [
    {"accession": "P03431", "type": "function", "question": QUESTION, "reference": ANSWER,
     "sepit": ANSWER, "llm only, no protein": "It binds zinc."},
    {"accession": "P03431", "type": "yes_no:go", "question": YES_NO, "reference": "Yes",
     "sepit": "No... yes", "llm only, no protein": "No"},
]  # fmt: skip
ORIGINAL_QA = {
    "id": "P03431",
    "conversation": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
    "response": f"{SYSTEM_PROMPT}What is the function of  ?  {ANSWER}",
}
ORIGINAL_YN = {
    "id": "P03431",
    "conversation": [{"role": "user", "content": YES_NO}, {"role": "assistant", "content": "No"}],
    "response": f"{SYSTEM_PROMPT}Does the protein  have the molecular function 'RNA binding'?  No, it does not.",
}


def write_lines(path: Path, lines: list) -> Path:
    """JSON lines; a bytes item is written as it is (a broken line)."""
    with path.open("wb") as handle:
        for line in lines:
            handle.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return path


def test_project_predictions_rescored_under_both_protocols_with_bad_records_skipped(tmp_path, capsys) -> None:
    bad = [
        b"{not json",
        b"\xff\xfe not utf-8",
        [1, 2],
        {"type": "function", "question": QUESTION, "sepit": "x"},  # no reference
        {"type": "function", "question": QUESTION, "reference": ANSWER, "sepit": 3},
        {"type": "function", "question": QUESTION, "reference": ANSWER},  # no system's answer
    ]
    predictions = write_lines(tmp_path / "predictions.jsonl", [PROJECT_RECORDS[0], *bad, b"", PROJECT_RECORDS[1]])
    for protocol in ("corpus", "sepit"):
        output = tmp_path / protocol
        argv = ["--predictions", str(predictions), "--output_dir", str(output), "--protocol", protocol]
        assert score["main"](argv) == 0
        out, err = capsys.readouterr()
        reasons = [line for line in err.splitlines() if line.startswith("score: ")]
        assert [line.split(": ")[1].rsplit(":", 1)[1] for line in reasons] == ["2", "3", "4", "5", "6", "7"]
        assert "record: a JSON list, not an object" in reasons[2] and "reference: missing" in reasons[3]
        assert "sepit: a int, not a string" in reasons[4] and "record: no answer" in reasons[5]
        assert "6 record(s) skipped" in out and f"Protocol `{protocol}`" in out
        results = json.loads((output / "metrics.json").read_text())
        assert list(results) == ["sepit", "llm only, no protein"]
        layers = 6 if protocol == "corpus" else None  # sepit: every layer, found from the model
        direct = score_answers(
            [record["sepit"] for record in PROJECT_RECORDS],
            [record["reference"] for record in PROJECT_RECORDS],
            [record["type"] for record in PROJECT_RECORDS],
            [False, True],
            default_bertscore_model(),
            layers,
            protocol=protocol,
            questions=[record["question"] for record in PROJECT_RECORDS],
        )
        assert results["sepit"]["overall"]["open"] == pytest.approx(direct["overall"]["open"])
        assert results["sepit"]["overall"]["closed"] == direct["overall"]["closed"]
        assert results["sepit"]["settings"] == direct["settings"]
        assert results["sepit"]["overall"]["closed"]["accuracy"] == (100.0 if protocol == "sepit" else 1.0)
        assert results["llm only, no protein"]["overall"]["closed"]["accuracy"] == 0.0


def test_the_original_inference_output_is_scored_as_the_paper(tmp_path, capsys) -> None:
    qa = write_lines(tmp_path / "qa_test_output.jsonl", [ORIGINAL_QA])
    yn = write_lines(tmp_path / "yn_test_output.jsonl", [ORIGINAL_YN, {**ORIGINAL_YN, "response": "I cannot say."}])
    project = write_lines(tmp_path / "predictions.jsonl", PROJECT_RECORDS)
    output = tmp_path / "rescored"
    argv = ["--predictions", str(qa), str(yn), str(project), "--output_dir", str(output), "--protocol", "sepit"]
    assert score["main"]([*argv, "--original_system", "sepit (original code)"]) == 0
    assert "0 record(s) skipped" in capsys.readouterr().out
    results = json.loads((output / "metrics.json").read_text())
    assert list(results) == ["sepit (original code)", "sepit", "llm only, no protein"]
    original = results["sepit (original code)"]
    # the echoed prompt is cut off: the answer is the reference word for word
    assert original["per_type"]["qa_test_output"]["open"]["bleu4"] == pytest.approx(100.0)
    assert original["per_type"]["qa_test_output"]["open"]["rougeL"] == pytest.approx(100.0)
    # "No" is read after the echoed question; a response with no yes/no is wrong
    assert original["per_type"]["yes_no:yn_test_output"]["closed"] == {"n": 2, "accuracy": 50.0, "no_answer": 1}
    markdown = (output / "metrics.md").read_text()
    assert "| metric | sepit (original code) | sepit | llm only, no protein |" in markdown


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        ([b"{not json"], [], "predictions: no readable record in"),
        ([ORIGINAL_QA], ["--protocol", "paper"], "protocol: 'paper'; choose from"),
        ([ORIGINAL_QA], ["--protocol", "sepit", "--bertscore_model", "none"], "bertscore_model: the sepit protocol"),
        ([ORIGINAL_QA], ["--protocol", "sepit", "--bertscore_num_layers", "3"], "bertscore_num_layers: the sepit"),
        ([ORIGINAL_QA], ["--original_system", " "], "original_system: empty"),
        ([{**PROJECT_RECORDS[1], "reference": "Maybe"}], [], "start with Yes or No"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, lines, extra, message) -> None:
    predictions = write_lines(tmp_path / "answers.jsonl", lines)
    assert score["main"](["--predictions", str(predictions), "--output_dir", str(tmp_path / "out"), *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("score: error: ") and message in error
    assert not (tmp_path / "out").exists()


def test_a_missing_file_and_an_output_over_the_input_are_refused(tmp_path, capsys) -> None:
    assert score["main"](["--predictions", str(tmp_path / "absent.jsonl"), "--output_dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("score: error: predictions: ") and error.endswith(
        "is not a file; give JSON-lines files of answers"
    )
    predictions = write_lines(tmp_path / "answers.jsonl", [ORIGINAL_QA])
    assert score["main"](["--predictions", str(predictions), "--output_dir", str(predictions)]) == 2
    assert capsys.readouterr().err.startswith("score: error: output_dir: ")
