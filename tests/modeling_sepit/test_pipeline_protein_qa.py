"""pipeline("protein-qa"): answers equal `model.generate` per request (greedy, beam search, several sequences, any
batch size); dict, list, generator, `datasets` and chat inputs; `return_full_text`; generation defaults from the
model's generation_config; PEFT adapter folders; the missing-processor and `<protein>`-id errors; converted original
checkpoints answer as the original did; remote code; Hub."""

import json
import shutil
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoProcessor, GenerationConfig, pipeline
from transformers.pipelines.pt_utils import KeyDataset

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.convert_original_sepit import convert
from modeling_sepit.hub_sepit import push_hub_folder, save_hub_folder
from tests.conftest import ORIGINAL, STRUCTURES, run_in_fresh_python, tiny_config


def protein_qa(folder: Path, **kwargs):
    """`pipeline("protein-qa")` on a saved folder: its config.json declares the task in `custom_pipelines`, which
    transformers builds only with `trust_remote_code=True`."""
    return pipeline("protein-qa", model=str(folder), trust_remote_code=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_folder(tiny_parts, tmp_path_factory) -> Path:
    """A tiny SEPIT saved with the standard pair `model.save_pretrained` + `processor.save_pretrained`."""
    torch.manual_seed(0)
    parts = [str(tiny_parts / "protein_model"), str(tiny_parts / "language_model")]
    processor = SepitProcessor.from_pretrained_parts(*parts)
    model = SepitForConditionalGeneration.from_pretrained_parts(*parts)
    with torch.no_grad():  # peaked logits, so that no near-tie can flip between batched and single runs
        model.lm_head.weight.mul_(10)
    folder = tmp_path_factory.mktemp("protein-qa") / "sepit"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> tuple[SepitForConditionalGeneration, SepitProcessor]:
    return SepitForConditionalGeneration.from_pretrained(tiny_folder).eval(), SepitProcessor.from_pretrained(
        tiny_folder
    )


@pytest.fixture(scope="module")
def qa(tiny_folder):
    return protein_qa(tiny_folder)


@pytest.fixture(scope="module")
def requests_(real_proteins) -> list[dict]:
    """Three requests of different lengths: coordinates, a question without a tag, a structure file."""
    (lysozyme, lysozyme_ca), (headpiece, _), _ = real_proteins
    return [
        {"question": "What is the function of <protein> ?", "sequence": lysozyme, "coords": lysozyme_ca.numpy()},
        {"question": "Where is it located ?", "sequence": headpiece},
        {"question": "Is <protein> an enzyme ?", "structure": str(STRUCTURES / "biopython__2BEG.cif"), "chain": "A"},
    ]


def protein_of(request: dict) -> dict:
    return {key: value for key, value in request.items() if key != "question"}


def generate_directly(
    model, processor, conversation: list[dict], proteins=None, continue_final_message: bool = False, **generate_kwargs
) -> list[str]:
    """The texts `model.generate` gives for one conversation, tokenised by the processor itself, undecorated."""
    batch = processor.apply_chat_template(
        conversation,
        proteins=proteins,
        add_generation_prompt=not continue_final_message,
        continue_final_message=continue_final_message,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**batch, **generate_kwargs)
    return [processor.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True) for row in output]


def direct_answers(model, processor, request: dict, **generate_kwargs) -> list[str]:
    """A request as the pipeline documents it: a user turn holding the question, `<protein>\\n` first when the
    question has no tag."""
    question = request["question"] if "<protein>" in request["question"] else f"<protein>\n{request['question']}"
    conversation = [{"role": "user", "content": question}]
    texts = generate_directly(model, processor, conversation, [protein_of(request)], **generate_kwargs)
    return [text.strip() for text in texts]


def answers(outputs: list[list[dict]]) -> list[list[str]]:
    return [[record["answer"] for record in records] for records in outputs]


@pytest.mark.parametrize(
    ("decoding", "sequences"),
    [({}, 1), ({"num_beams": 3}, 1), ({"num_beams": 3}, 2)],
    ids=["greedy", "beam", "beam-2-sequences"],
)
def test_answers_equal_generate_per_request_in_any_batch(qa, tiny, requests_, decoding, sequences):
    settings = {"max_new_tokens": 6, "num_return_sequences": sequences, **decoding}
    expected = [direct_answers(*tiny, request, **settings) for request in requests_]
    assert len({tuple(texts) for texts in expected}) == len(requests_)  # a misattributed answer would show
    for batch_size in (1, 2, 3):
        assert answers(qa(requests_, batch_size=batch_size, **settings)) == expected, f"batch_size={batch_size}"
    # A single input gives its list of answers, as text-generation does.
    single = qa(requests_[1], **settings)
    assert isinstance(single, list) and [record["answer"] for record in single] == expected[1]


def as_column(value: object) -> object:
    return value.tolist() if hasattr(value, "tolist") else value


def test_generator_dataset_and_key_dataset_stream_the_answers_of_a_list(qa, requests_):
    expected = qa(requests_, max_new_tokens=4)
    pulled = []

    def requests_one_by_one():
        for request in requests_:
            pulled.append(request)
            yield request

    stream = iter(qa(requests_one_by_one(), max_new_tokens=4))
    assert next(stream) == expected[0] and len(pulled) == 1  # consumed as answered, not materialised
    assert list(stream) == expected[1:]

    columns = ("question", "sequence", "coords", "structure", "chain")  # None where a request has no such field
    table = Dataset.from_dict({key: [as_column(request.get(key)) for request in requests_] for key in columns})
    for inputs in (table, KeyDataset(Dataset.from_dict({"request": list(table)}), "request")):
        results = qa(inputs, batch_size=2, max_new_tokens=4)
        assert not isinstance(results, list)  # an iterator, as transformers returns for datasets
        assert list(results) == expected


def protein_chat(sequence: str, coords, question: str) -> list[dict]:
    protein = {"type": "protein", "sequence": sequence, "coords": coords.tolist()}
    return [{"role": "user", "content": [protein, {"type": "text", "text": question}]}]


def test_chat_input_answers_as_generate_and_returns_the_chat(qa, tiny, real_proteins):
    (lysozyme, lysozyme_ca), (headpiece, headpiece_ca), _ = real_proteins
    chats = [
        protein_chat(lysozyme, lysozyme_ca, "What does this protein do ?"),
        protein_chat(headpiece, headpiece_ca, "Where is it found ?"),
    ]
    expected = [generate_directly(*tiny, chat, max_new_tokens=5)[0] for chat in chats]
    out = qa(chats[0], max_new_tokens=5)
    assert out == [
        {"answer": expected[0].strip(), "generated_text": [*chats[0], {"role": "assistant", "content": expected[0]}]}
    ]
    new_text = qa(chats, batch_size=2, max_new_tokens=5, return_full_text=False)
    assert new_text == [[{"answer": text.strip(), "generated_text": text}] for text in expected]

    for stored in (KeyDataset(Dataset.from_dict({"messages": chats}), "messages"), (chat for chat in chats)):
        assert [records[0]["answer"] for records in qa(stored, batch_size=2, max_new_tokens=5)] == [
            text.strip() for text in expected
        ]


def test_chat_ending_with_an_assistant_message_is_continued(qa, tiny, real_proteins):
    _, (headpiece, headpiece_ca), _ = real_proteins
    chat = [*protein_chat(headpiece, headpiece_ca, "What is it ?"), {"role": "assistant", "content": "It is"}]
    continued = generate_directly(*tiny, chat, max_new_tokens=4, continue_final_message=True)[0]
    out = qa(chat, max_new_tokens=4)[0]
    assert out["generated_text"] == [*chat[:-1], {"role": "assistant", "content": "It is" + continued}]
    assert qa(chat, max_new_tokens=4, return_full_text=False)[0]["generated_text"] == continued


def test_return_full_text_on_a_request(qa, tiny, requests_):
    request = requests_[0]
    conversation = [{"role": "user", "content": request["question"]}]
    raw = generate_directly(*tiny, conversation, [protein_of(request)], max_new_tokens=5)[0]
    assert qa(request, max_new_tokens=5) == [{"answer": raw.strip(), "generated_text": request["question"] + raw}]
    assert qa(request, max_new_tokens=5, return_full_text=False) == [{"answer": raw.strip(), "generated_text": raw}]


def test_generation_config_gives_the_defaults_and_the_caller_overrides_them(qa, tiny_folder, tmp_path, requests_):
    folder = tmp_path / "three-tokens"
    shutil.copytree(tiny_folder, folder)
    saved = GenerationConfig.from_pretrained(folder)
    saved.update(max_new_tokens=3, min_new_tokens=3)
    saved.save_pretrained(folder)
    model = SepitForConditionalGeneration.from_pretrained(folder).eval()
    processor = SepitProcessor.from_pretrained(folder)
    request = requests_[0]
    batch = processor.apply_chat_template(
        [{"role": "user", "content": request["question"]}],
        proteins=[protein_of(request)],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    prompt = batch["input_ids"].shape[1]
    with torch.no_grad():
        expected = model.generate(**batch)[0].tolist()  # generate reads generation_config.json too

    def new_tokens(outputs: list[dict]) -> int:
        return len(outputs[0]["generated_token_ids"]) - prompt

    three = protein_qa(folder)
    assert three(request, return_tensors=True) == [{"generated_token_ids": expected}]
    assert len(expected) - prompt == 3
    assert new_tokens(three(request, return_tensors=True, max_new_tokens=5, min_new_tokens=5)) == 5
    assert (
        new_tokens(three(request, return_tensors=True, generate_kwargs={"max_new_tokens": 4, "min_new_tokens": 4})) == 4
    )
    two = GenerationConfig(max_new_tokens=2, min_new_tokens=2)
    assert new_tokens(three(request, return_tensors=True, generation_config=two)) == 2
    assert new_tokens(protein_qa(folder, max_new_tokens=6, min_new_tokens=6)(request, return_tensors=True)) == 6

    # Where neither the model nor the caller sets it, max_new_tokens is the pipeline's 256 (as image-text-to-text).
    assert "max_new_tokens" not in qa.model.generation_config.to_diff_dict()
    with mock.patch.object(qa.model, "generate", wraps=qa.model.generate) as spy:
        qa(request)
    assert spy.call_args.kwargs["max_new_tokens"] == 256


def test_peft_adapter_folder_answers_like_the_merged_model(qa, tiny_folder, tmp_path, requests_):
    model = SepitForConditionalGeneration.from_pretrained(tiny_folder)
    adapters = LoraConfig(
        r=2,
        target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
        init_lora_weights=False,  # random adapters, so that answers change
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, adapters)
    adapter_folder = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_folder)
    adapter_config = json.loads((adapter_folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tiny_folder)
    (adapter_folder / "adapter_config.json").write_text(json.dumps(adapter_config))

    merged = pipeline(
        "protein-qa", model=peft_model.merge_and_unload(), processor=AutoProcessor.from_pretrained(tiny_folder)
    )
    expected = answers(merged(requests_, max_new_tokens=6))
    assert answers(protein_qa(adapter_folder)(requests_, batch_size=2, max_new_tokens=6)) == expected
    assert answers(qa(requests_, max_new_tokens=6)) != expected  # the adapters were loaded


def test_bf16_by_dtype_argument_or_saved_checkpoint_answers_as_the_bf16_model(tiny_folder, tmp_path, requests_):
    """bf16 weights the transformers way (benchmarks/README.md: 2.7x on a CPU prompt pass with AMX): `dtype=` to
    pipeline(), or a checkpoint saved in bf16 loaded with the default `dtype="auto"`; coordinates and structure files
    go through the bf16 structure module; `dtype=torch.float32` still gives fp32 from a bf16 checkpoint."""
    model = SepitForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.bfloat16).eval()
    processor = SepitProcessor.from_pretrained(tiny_folder)
    expected = [direct_answers(model, processor, request, max_new_tokens=6) for request in requests_]
    by_argument = protein_qa(tiny_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in by_argument.model.parameters()} == {torch.bfloat16}
    assert answers(by_argument(requests_, batch_size=2, max_new_tokens=6)) == expected

    model.save_pretrained(tmp_path / "bf16")
    processor.save_pretrained(tmp_path / "bf16")
    saved = protein_qa(tmp_path / "bf16")
    assert {p.dtype for p in saved.model.parameters()} == {torch.bfloat16}
    assert answers(saved(requests_, max_new_tokens=6)) == expected
    assert protein_qa(tmp_path / "bf16", dtype=torch.float32).model.dtype == torch.float32


def test_a_folder_without_processor_says_so(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ValueError, match="has no SEPIT processor") as info:
        protein_qa(tmp_path / "weights-only")
    assert "processor_config.json" in str(info.value) and "processor.save_pretrained(folder)" in str(info.value)
    with pytest.raises(ValueError, match="names no folder"):
        pipeline("protein-qa", model=SepitForConditionalGeneration(tiny_config()))


def test_a_processor_that_fails_to_load_says_why(tiny_folder, tmp_path):
    folder = tmp_path / "broken-processor"
    shutil.copytree(tiny_folder, folder)
    (folder / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="the SEPIT processor could not be loaded"):
        protein_qa(folder)


def test_model_and_processor_must_agree_on_the_protein_id(tiny_folder):
    model = SepitForConditionalGeneration.from_pretrained(tiny_folder)
    processor = SepitProcessor.from_pretrained(tiny_folder)
    model.config.protein_token_id = processor.protein_token_id - 1
    with pytest.raises(ValueError, match=rf"says {processor.protein_token_id - 1} .* is {processor.protein_token_id}"):
        pipeline("protein-qa", model=model, processor=processor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 2, "generate_kwargs": {"max_new_tokens": 3}}, "given both directly and in generate_kwargs"),
        ({"generation_config": GenerationConfig(max_new_tokens=10**6)}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"processor_kwargs": {"padding_side": "right"}}, "needs left padding"),
        ({"processor_kwargs": {"proteins": []}}, "set by the pipeline"),
        ({"return_dict_in_generate": True}, "return_dict_in_generate"),
        ({"add_special_tokens": False}, "add_special_tokens"),
        ({"return_full_text": False, "return_tensors": True}, "mutually exclusive"),
        ({"continue_final_message": True}, "only for chat inputs"),
    ],
)
def test_arguments_it_cannot_honour_are_refused(qa, requests_, kwargs, message):
    with pytest.raises(ValueError, match=message):
        qa(requests_[1], **kwargs)


def test_a_chat_protein_must_be_an_item(qa):
    with pytest.raises(ValueError, match="1 `<protein>` tags but 0 protein items"):
        qa([{"role": "user", "content": "What is <protein> ?"}])


# --- converted original checkpoints, remote code, Hub -----------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / "moe-top1"
    convert(ORIGINAL / "original-tiny-moe-top1", folder, protein_padding_length=48)
    return folder


@pytest.fixture(scope="module")
def converted_qa(converted):
    return protein_qa(converted)


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


def test_converted_checkpoint_answers_as_the_original(converted_qa):
    for requests, expected in original_requests("original-tiny-moe-top1"):
        batched = converted_qa(requests, batch_size=2, max_new_tokens=12, eos_token_id=2)
        assert [records[0]["answer"] for records in batched] == expected
        one_by_one = [converted_qa(request, max_new_tokens=12, eos_token_id=2)[0]["answer"] for request in requests]
        assert one_by_one == expected


def test_structure_file_input_and_question_without_tag(converted_qa):
    out = converted_qa(
        {"question": "What is the function of the protein ?", "structure": str(STRUCTURES / "biopython__1LCD.pdb")},
        max_new_tokens=4,
    )
    assert isinstance(out[0]["answer"], str)


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
def test_bad_requests_raise_value_error(converted_qa, request_, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        converted_qa(request_)


def test_huge_max_new_tokens_is_refused(converted_qa):
    with pytest.raises(ValueError, match="max_new_tokens"):
        converted_qa({"question": "What ?", "sequence": "MKTAYIAK"}, max_new_tokens=10**9)


REMOTE_PIPELINE = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_sepit"] = None  # only the folder's own code may run
    from transformers import pipeline
    folder, requests_path = sys.argv[1:]
    qa = pipeline("protein-qa", model=folder, trust_remote_code=True)
    assert type(qa).__module__.startswith("transformers_modules"), type(qa).__module__
    requests = json.load(open(requests_path))
    outputs = qa(requests, batch_size=2, max_new_tokens=12, eos_token_id=2)
    print(json.dumps([records[0]["answer"] for records in outputs]))
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
    requests, expected = original_requests("original-tiny-moe-top1")[0]
    for request in requests:
        if "coords" in request:
            request["coords"] = request["coords"].tolist()
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    stdout = run_in_fresh_python(REMOTE_PIPELINE, [str(folder), str(tmp_path / "requests.json")], tmp_path)
    assert json.loads(stdout.strip().splitlines()[-1]) == expected


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
