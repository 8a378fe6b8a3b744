"""pipeline("protein-qa"): converted original checkpoints answer as the original did; batching; remote code; Hub."""

import json
import textwrap
from unittest import mock

import pytest
from safetensors.torch import load_file
from transformers import AutoProcessor, pipeline

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.convert_original_sepit import convert
from modeling_sepit.hub_sepit import push_hub_folder, save_hub_folder
from tests.conftest import ORIGINAL, STRUCTURES, run_in_fresh_python


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / "moe-top1"
    convert(ORIGINAL / "original-tiny-moe-top1", folder, protein_padding_length=48)
    return folder


def original_requests(case: str) -> list[tuple[list[dict], list[str]]]:
    """The fixture's two batches as pipeline requests, with the answers the original generated."""
    expected = json.loads((ORIGINAL / case / "expected_outputs.json").read_text())
    tensors = load_file(ORIGINAL / case / "expected_outputs.safetensors")
    questions = json.loads((ORIGINAL / "cases.json").read_text())["questions"]
    tokenizer = AutoProcessor.from_pretrained(ORIGINAL / case / "text_tokenizer")
    batches = []
    for name, batch in expected.items():
        requests = []
        for i, sequence in enumerate(batch["sequences"]):
            request = {"question": questions[batch["question_index"][i]], "sequence": sequence}
            if batch["has_structure"][i]:
                request["coords"] = tensors[f"{name}.node_position"][i, 1 : 1 + len(sequence)].numpy()
            requests.append(request)
        new_tokens = tensors[f"{name}.gen_output_ids"][:, tensors[f"{name}.gen_input_ids"].shape[1] :]
        answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
        batches.append((requests, answers))
    return batches


def test_converted_checkpoint_answers_as_the_original(converted):
    qa = pipeline("protein-qa", model=str(converted))
    for requests, answers in original_requests("original-tiny-moe-top1"):
        batched = qa(requests, batch_size=2, max_new_tokens=12, eos_token_id=2)
        assert [out["answer"] for out in batched] == answers
        one_by_one = [qa(request, max_new_tokens=12, eos_token_id=2)["answer"] for request in requests]
        assert one_by_one == answers


def test_structure_file_input_and_question_without_tag(converted):
    qa = pipeline("protein-qa", model=str(converted))
    out = qa(
        {"question": "What is the function of the protein ?", "structure": str(STRUCTURES / "biopython__1LCD.pdb")},
        max_new_tokens=4,
    )
    assert isinstance(out["answer"], str)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"sequence": "MKTAYIAK"}, "question"),
        ({"question": "  ", "sequence": "MKTAYIAK"}, "question"),
        ({"question": "What is it ?"}, "no protein given"),
        ({"question": "What is <protein> and <protein> ?", "sequence": "MKTAYIAK"}, "2 `<protein>` tags"),
        ({"question": "What ?", "sequence": "MKTAYIAK", "chain": "A"}, "chain"),
        ({"question": "What ?", "sequence": "MKTAYIAK", "colour": "red"}, "unknown input keys"),
        ({"question": "What ?", "structure": str(STRUCTURES / "nowhere.cif")}, "nowhere.cif"),
        ("What is this protein ?", "must be dicts"),
    ],
)
def test_bad_requests_raise_value_error(converted, request_, message):
    qa = pipeline("protein-qa", model=str(converted))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        qa(request_)


def test_huge_max_new_tokens_is_refused(converted):
    qa = pipeline("protein-qa", model=str(converted))
    with pytest.raises(ValueError, match="max_new_tokens"):
        qa({"question": "What ?", "sequence": "MKTAYIAK"}, max_new_tokens=10**9)


REMOTE_PIPELINE = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_sepit"] = None  # only the folder's own code may run
    from transformers import pipeline
    folder, requests_path = sys.argv[1:]
    qa = pipeline("protein-qa", model=folder, trust_remote_code=True)
    assert type(qa).__module__.startswith("transformers_modules"), type(qa).__module__
    requests = json.load(open(requests_path))
    print(json.dumps([out["answer"] for out in qa(requests, batch_size=2, max_new_tokens=12, eos_token_id=2)]))
    """
)


def test_hub_folder_works_with_remote_code_in_a_fresh_process(converted, tmp_path):
    model = SepitForConditionalGeneration.from_pretrained(converted)
    processor = AutoProcessor.from_pretrained(converted)
    folder = save_hub_folder(model, processor, tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    assert "protein-qa" in config["custom_pipelines"]
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("SepitForConditionalGeneration")
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"]
    for name in ("model.safetensors", "pipeline_protein_qa.py", "processing_sepit.py", "structure_loading.py"):
        assert (folder / name).is_file(), name
    requests, answers = original_requests("original-tiny-moe-top1")[0]
    for request in requests:
        if "coords" in request:
            request["coords"] = request["coords"].tolist()
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    stdout = run_in_fresh_python(REMOTE_PIPELINE, [str(folder), str(tmp_path / "requests.json")], tmp_path)
    assert json.loads(stdout.strip().splitlines()[-1]) == answers


def test_push_uploads_the_folder_at_the_network_boundary(converted, tmp_path):
    model = SepitForConditionalGeneration.from_pretrained(converted)
    folder = save_hub_folder(model, AutoProcessor.from_pretrained(converted), tmp_path / "hub")
    with mock.patch("modeling_sepit.hub_sepit.HfApi") as api:
        api.return_value.upload_folder.return_value = "https://huggingface.co/me/sepit/commit/abc"
        url = push_hub_folder(folder, "me/sepit", token="t0k", private=True)
    api.assert_called_once_with(token="t0k")
    api.return_value.create_repo.assert_called_once_with("me/sepit", repo_type="model", private=True, exist_ok=True)
    kwargs = api.return_value.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == str(folder) and kwargs["repo_id"] == "me/sepit"
    assert url.endswith("abc")
    with pytest.raises(ValueError, match="not a complete SEPIT folder"):
        push_hub_folder(tmp_path, "me/sepit")
