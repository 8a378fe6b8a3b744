"""sepit-export-llm: the exported LLM, loaded with AutoModelForCausalLM in a process without SEPIT's code, given
SEPIT's spliced input embeddings, computes SEPIT's logits and greedy answers (dense Llama, and upcycled MoE as Mixtral
at top-1 and top-2 with distinct experts); what Mixtral cannot express is refused, and no path it did not write is
replaced."""

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import modeling_utils

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.atomic_folder import MARKER
from modeling_sepit.export_llm import EXPORT_FILE, export_llm, load_protein_side, prompt_embeddings, stock_causal_lm
from tests.conftest import (
    STRUCTURES,
    pad,
    prompt_ids,
    protein_batch,
    run_command_line,
    run_in_fresh_python,
    tiny_config,
)

VARIANTS = {"dense": None, "moe-top1": 1, "moe-top2": 2}
NEW_TOKENS = 12
# What a server holding only the exported folder runs: transformers alone (no SEPIT code can be imported).
STOCK_LLM = """
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

root, new_tokens = Path(sys.argv[1]), int(sys.argv[2])
inputs = load_file(root / "inputs.safetensors")
outputs = {}
for variant in sys.argv[3:]:
    llm = AutoModelForCausalLM.from_pretrained(root / variant, dtype=torch.float32)
    embeds = inputs[variant]
    with torch.no_grad():
        outputs[f"{variant}/logits"] = llm(inputs_embeds=embeds, attention_mask=inputs["mask"]).logits
        outputs[f"{variant}/tokens"] = llm.generate(
            inputs_embeds=embeds, attention_mask=inputs["mask"], max_new_tokens=new_tokens, do_sample=False
        )
    outputs[f"{variant}/class"] = torch.tensor([ord(c) for c in type(llm).__name__])
save_file(outputs, root / "outputs.safetensors")
"""


def upcycled(model: SepitForConditionalGeneration, top_k: int) -> SepitForConditionalGeneration:
    """`model` upcycled to 4 experts with `top_k` routing, every expert and router then made distinct (upcycled copies
    of one FFN would hide an expert or a routing weight mapped to the wrong place)."""
    moe = copy.deepcopy(model).upcycle_to_moe(num_experts=4, num_experts_per_tok=top_k)
    generator = torch.Generator().manual_seed(top_k)
    with torch.no_grad():
        for layer in moe.model.language_model.layers:
            for parameter in layer.mlp.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return moe.eval()


@pytest.fixture(scope="module")
def sepit_folders(model_and_processor, tmp_path_factory) -> dict[str, tuple[SepitForConditionalGeneration, object]]:
    """Each variant saved with the processor, as a SEPIT folder: name -> (model, folder)."""
    model, processor = model_and_processor
    root = tmp_path_factory.mktemp("sepit")
    folders = {}
    for name, top_k in VARIANTS.items():
        variant = model if top_k is None else upcycled(model, top_k)
        variant.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        folders[name] = (variant, root / name)
    return folders


@pytest.fixture(scope="module")
def prompts(model_and_processor, real_proteins) -> dict:
    """Three real proteins (coordinates, sequence only, a structure file), left-padded in one batch."""
    _, processor = model_and_processor
    (lysozyme, lysozyme_ca), (headpiece, _), _ = real_proteins
    proteins = [
        [{"sequence": lysozyme, "coords": lysozyme_ca.numpy()}],
        [headpiece],
        [(str(STRUCTURES / "biopython__2BEG.cif"), "A")],
    ]
    texts = ["What is the function of <protein> ?", "Is <protein> an enzyme ?", "<protein>\nWhere is it located ?"]
    return dict(processor(text=texts, proteins=proteins, padding=True, padding_side="left", return_tensors="pt"))


@pytest.fixture(scope="module")
def exported(sepit_folders, prompts, tmp_path_factory) -> tuple[dict, dict]:
    """Every variant exported, then run in one fresh process: (export folders, that process's outputs by variant)."""
    root = tmp_path_factory.mktemp("exported")
    folders = {name: export_llm(folder, root / name) for name, (_, folder) in sepit_folders.items()}
    inputs = {name: prompt_embeddings(model, **prompts).contiguous() for name, (model, _) in sepit_folders.items()}
    save_file(inputs | {"mask": prompts["attention_mask"]}, root / "inputs.safetensors")
    run_in_fresh_python(STOCK_LLM, [str(root), str(NEW_TOKENS), *VARIANTS], root)
    outputs = {name: {} for name in VARIANTS}
    for key, value in load_file(root / "outputs.safetensors").items():
        variant, what = key.split("/")
        outputs[variant][what] = value
    return folders, outputs


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_llm_given_sepits_embeddings_computes_sepits_logits(variant, sepit_folders, prompts, exported):
    model, _ = sepit_folders[variant]
    _, outputs = exported
    with torch.no_grad():
        expected = model(**prompts).logits
    architecture = "".join(map(chr, outputs[variant]["class"].tolist()))
    assert architecture == ("LlamaForCausalLM" if VARIANTS[variant] is None else "MixtralForCausalLM")
    mask = prompts["attention_mask"].bool()  # padded positions' logits are meaningless in both
    torch.testing.assert_close(outputs[variant]["logits"][mask], expected[mask], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_llm_greedy_answers_equal_sepits(variant, sepit_folders, prompts, exported):
    model, _ = sepit_folders[variant]
    _, outputs = exported
    with torch.no_grad():
        expected = model.generate(**prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(outputs[variant]["tokens"], expected[:, prompts["input_ids"].shape[1] :])


@pytest.mark.parametrize(
    ("model_type", "top_k", "architecture"),
    [
        ("qwen2", None, "Qwen2ForCausalLM"),
        ("mistral", None, "MistralForCausalLM"),
        ("mistral", 2, "MixtralForCausalLM"),
    ],
    ids=["qwen2", "mistral", "mistral-moe"],
)
def test_other_llms_export_as_their_stock_class(model_type, top_k, architecture, real_proteins, protein_tokenizer):
    """Qwen2 (attention biases) and Mistral (sliding window, as Mixtral has) give SEPIT's logits too."""
    torch.manual_seed(0)
    text_config = {**tiny_config().text_config.to_dict(), "model_type": model_type, "sliding_window": 8}
    for name in ("num_experts", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef", "head_dim"):
        text_config.pop(name, None)
    model = SepitForConditionalGeneration(tiny_config(text_config=text_config)).eval()
    if top_k is not None:
        model = upcycled(model, top_k)
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, mask = pad(prompt_ids(batch["protein_attention_mask"].sum(-1).tolist()), "left")
    llm = stock_causal_lm(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, **batch).logits
        embeds = prompt_embeddings(model, input_ids=ids, attention_mask=mask, **batch)
        logits = llm(inputs_embeds=embeds, attention_mask=mask).logits
    assert type(llm).__name__ == architecture
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-5)


def test_the_folder_is_a_stock_checkpoint_naming_its_sepit_folder(sepit_folders, exported):
    folders, _ = exported
    moe_config = json.loads((folders["moe-top2"] / "config.json").read_text())
    assert moe_config["model_type"] == "mixtral" and moe_config["architectures"] == ["MixtralForCausalLM"]
    assert (moe_config["num_local_experts"], moe_config["num_experts_per_tok"]) == (4, 2)
    with safe_open(folders["moe-top2"] / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    # Mixtral's usual per-expert layout (what vLLM, TGI and llama.cpp's converter read), not transformers' fused one
    assert {f"model.layers.0.block_sparse_moe.experts.3.w{i}.weight" for i in (1, 2, 3)} <= keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    dense_config = json.loads((folders["dense"] / "config.json").read_text())
    assert dense_config["model_type"] == "llama" and "num_experts" not in dense_config
    model, sepit_folder = sepit_folders["dense"]
    record = json.loads((folders["dense"] / EXPORT_FILE).read_text())
    assert record["sepit_model"] == str(sepit_folder.resolve())
    assert record["protein_token_id"] == model.config.protein_token_id
    assert record["protein_side"] == "modeling_sepit.export_llm.load_protein_side"
    generation = json.loads((folders["dense"] / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [model.config.protein_token_id]  # as SEPIT's generate
    assert (folders["dense"] / "tokenizer.json").is_file()


def test_the_protein_side_loads_without_the_llm_layers_and_embeds_the_same(sepit_folders, prompts):
    model, folder = sepit_folders["moe-top2"]
    reports = []
    handler = logging.Handler()
    handler.emit = reports.append
    report_logger = logging.getLogger(modeling_utils.__name__)
    report_logger.addHandler(handler)
    try:
        protein_side, processor = load_protein_side(folder)
    finally:
        report_logger.removeHandler(handler)
    assert not reports  # the layers left out are not reported as a loading problem
    assert len(protein_side.model.language_model.layers) == 0
    assert processor.protein_token_id == model.config.protein_token_id
    assert torch.equal(prompt_embeddings(protein_side, **prompts), prompt_embeddings(model, **prompts))


def test_unnormalised_routing_is_refused_as_mixtral_cannot_express_it(model_and_processor, tmp_path):
    model, processor = model_and_processor
    original_routing = copy.deepcopy(model).upcycle_to_moe(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
    with pytest.raises(ValueError, match="norm_topk_prob=False: the original release's un-normalised"):
        stock_causal_lm(original_routing)
    original_routing.save_pretrained(tmp_path / "sepit")
    processor.save_pretrained(tmp_path / "sepit")
    argv = ["--model_name_or_path", str(tmp_path / "sepit"), "--output_dir", str(tmp_path / "llm")]
    code, _, err = run_command_line(["sepit-export-llm", *argv])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "norm_topk_prob=False" in err
    assert not (tmp_path / "llm").exists() and not list(tmp_path.glob(".llm.*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_experts": 2, "expert_eval_capacity_factor": 2.0}, "expert_eval_capacity_factor=2.0: SEPIT drops"),
        ({"num_experts": 2, "model_type": "qwen2"}, "model_type='qwen2': an MoE exports as MixtralForCausalLM"),
        ({"num_experts": 2, "attention_bias": True}, "attention_bias=True: Mixtral's layers have no biases"),
    ],
    ids=["eval-capacity", "qwen2-moe", "attention-bias"],
)
def test_what_mixtral_cannot_compute_is_refused(overrides, message):
    config = tiny_config()
    text_config = {**config.text_config.to_dict(), **overrides}
    for name in ("num_experts", "expert_eval_capacity_factor"):
        text_config.pop(name, None)
    experts = {name: overrides[name] for name in ("num_experts", "expert_eval_capacity_factor") if name in overrides}
    model = SepitForConditionalGeneration(tiny_config(text_config=text_config, **experts))
    with pytest.raises(ValueError, match=message):
        stock_causal_lm(model)


def test_cli_writes_only_paths_it_may(sepit_folders, tmp_path):
    _, folder = sepit_folders["moe-top1"]
    output = tmp_path / "llm"
    argv = ["sepit-export-llm", "--model_name_or_path", str(folder), "--output_dir", str(output)]
    code, out, err = run_command_line(argv)
    assert code == 0, err
    assert "MixtralForCausalLM" in out and (output / MARKER).is_file()
    assert run_command_line(argv)[0] == 0  # an earlier export is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    code, _, err = run_command_line([*argv[:-1], str(other)])
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert [path.name for path in other.iterdir()] == ["notes.txt"]
    code, _, err = run_command_line([*argv[:-1], str(folder / "llm")])  # inside the SEPIT folder it reads
    assert code == 2 and "lies inside the input" in err
