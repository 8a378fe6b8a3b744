"""SEPIT model: encoder equivalences, splicing, batching, generation, MoE upcycling, saving and remote code."""

import copy
import json
import math
import re
import shutil
import textwrap
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    EsmModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils.hub import PushToHubMixin

from modeling_sepit import SepitConfig, SepitForConditionalGeneration, SepitProcessor
from tests.conftest import PAD_ID, PROTEIN_TOKEN_ID, pad, prompt_ids, protein_batch, run_in_fresh_python, tiny_config


@pytest.fixture(scope="module")
def model() -> SepitForConditionalGeneration:
    torch.manual_seed(0)
    return SepitForConditionalGeneration(tiny_config(structure_embedding_scale=0.1)).eval()


def feature_counts(batch: dict) -> list[int]:
    return batch["protein_attention_mask"].sum(-1).tolist()


ESM_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "LayerNorm",
)


def test_without_coordinates_the_encoder_is_plain_esm2(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins, protein_tokenizer, with_coords=False)
    plain = EsmModel(model.config.protein_config, add_pooling_layer=False).eval()
    result = plain.load_state_dict(model.model.protein_model.state_dict(), strict=False)
    # SEPIT keeps the ESM layers up to the projected one (-2): the top layer, final norm and contact head are unused.
    top = model.config.protein_config.num_hidden_layers - 1
    assert not result.unexpected_keys and {
        key.split(".weight")[0].split(".bias")[0] for key in result.missing_keys
    } == {
        *(f"encoder.layer.{top}.{name}" for name in ESM_LAYER_PARTS),
        "encoder.emb_layer_norm_after",
        "contact_head.regression",
    }
    with torch.no_grad():
        ours = model.model.get_protein_features(**batch)
        hidden = plain(
            input_ids=batch["protein_input_ids"],
            attention_mask=batch["protein_attention_mask"],
            output_hidden_states=True,
        ).hidden_states[-2]
        expected = model.model.multi_modal_projector(hidden[batch["protein_attention_mask"].bool()])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_coordinates_change_the_features(model, real_proteins, protein_tokenizer):
    with torch.no_grad():
        with_structure = model.model.get_protein_features(**protein_batch(real_proteins, protein_tokenizer))
        without = model.model.get_protein_features(**protein_batch(real_proteins, protein_tokenizer, with_coords=False))
    assert (with_structure - without).norm() > 0.05 * without.norm()


def test_batch_of_one_equals_batch_of_three(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins, protein_tokenizer)
    with torch.no_grad():
        together = model.model.get_protein_features(**batch)
        alone = torch.cat(
            [model.model.get_protein_features(**protein_batch([p], protein_tokenizer)) for p in real_proteins]
        )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", [1, 2])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cpu_inference_encodes_in_length_sorted_calls_with_the_one_call_features(
    real_proteins, protein_tokenizer, pooling, padding_side
):
    """Six proteins (2 x 131, 2 x 53, 2 x 28 positions: 786 padded) exceed CPU_ENCODER_POSITIONS, so inference splits
    them into two calls cut to their own width; training (gradients on) keeps the one padded call. Same features, in
    the same protein order, either padding side, with coordinates and pooling."""
    torch.manual_seed(0)
    sepit = SepitForConditionalGeneration(tiny_config(protein_pooling=pooling)).eval()
    proteins = [real_proteins[i] for i in (0, 1, 2, 2, 1, 0)]
    batch = protein_batch(proteins, protein_tokenizer)
    if padding_side == "left":  # the same proteins, padding moved to the front
        width = batch["protein_attention_mask"].shape[1]
        shifts = width - batch["protein_attention_mask"].sum(-1)
        batch = {k: torch.stack([v[i].roll(int(s), 0) for i, s in enumerate(shifts)]) for k, v in batch.items()}
    assert sepit.model._encoder_calls(batch["protein_attention_mask"]) is None  # gradients on: one call
    one_call = sepit.model.get_protein_features(**batch).detach()
    with torch.no_grad():
        assert sepit.model._encoder_calls(batch["protein_attention_mask"]) == [[2, 3, 1, 4], [0, 5]]
        split = sepit.model.get_protein_features(**batch, return_dict=True).pooler_output
        with mock.patch("modeling_sepit.modeling_sepit.CPU_ENCODER_POSITIONS", 10**6):
            assert sepit.model._encoder_calls(batch["protein_attention_mask"]) is None
    assert [len(f) for f in split] == [-(-n // pooling) for n in batch["protein_attention_mask"].sum(-1).tolist()]
    torch.testing.assert_close(torch.cat(split), one_call, atol=1e-5, rtol=1e-5)


def test_forward_splices_features_and_keeps_length(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins, protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    labels = ids.masked_fill((mask == 0) | (ids == PROTEIN_TOKEN_ID), -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **batch)
    assert out.logits.shape == (*ids.shape, model.config.text_config.vocab_size)
    assert out.protein_features.shape[0] == int((ids == PROTEIN_TOKEN_ID).sum())
    assert torch.isfinite(out.loss)
    hidden = model.model(input_ids=ids, attention_mask=mask, **batch).last_hidden_state
    assert hidden.shape[:2] == ids.shape  # TRL multiplies this by the LM head against `labels`


def test_several_proteins_in_one_prompt_and_text_only_prompts(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    first, second = feature_counts(batch)
    rows = [[1, 5, *[PROTEIN_TOKEN_ID] * first, 6, *[PROTEIN_TOKEN_ID] * second, 7], [1, 8, 9, 10]]
    ids, mask = pad(rows, "right")
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, **batch).logits
        text_only = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
    torch.testing.assert_close(both[1, :4], text_only[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_batched_equals_one_by_one(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins, protein_tokenizer)
    prompts = prompt_ids(feature_counts(batch), seed=1)
    ids, mask = pad(prompts, "left")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
    with torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, **batch, **settings)[:, ids.shape[1] :]
        for i, prompt in enumerate(prompts):
            single = protein_batch([real_proteins[i]], protein_tokenizer)
            alone = model.generate(input_ids=torch.tensor([prompt]), **single, **settings)[:, len(prompt) :]
            assert torch.equal(together[i], alone[0]), i


def test_generation_runs_the_encoder_once(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins[:1], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "left")
    calls = []
    hook = model.model.protein_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(input_ids=ids, attention_mask=mask, **batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moe_computes_what_the_dense_model_did(real_proteins, protein_tokenizer, top_k):
    torch.manual_seed(0)
    dense = SepitForConditionalGeneration(tiny_config()).eval()
    batch = protein_batch(real_proteins, protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    with torch.no_grad():
        before = dense(input_ids=ids, attention_mask=mask, **batch).logits
        dense_params = sum(p.numel() for p in dense.parameters())
        moe = dense.upcycle_to_moe(num_experts=4, num_experts_per_tok=top_k, norm_topk_prob=True)
        after = moe(input_ids=ids, attention_mask=mask, **batch, output_router_logits=True)
    torch.testing.assert_close(after.logits, before, atol=1e-5, rtol=1e-5)
    if top_k == 1:
        assert torch.equal(after.logits, before)
    assert len(after.router_logits) == 2 and after.router_logits[0].shape == (ids.numel(), 4)
    assert torch.isfinite(after.aux_loss)
    assert moe.config.get_text_config().num_experts == 4
    expert_params = sum(p.numel() for layer in moe.model.language_model.layers for p in layer.mlp.experts.parameters())
    router_params = sum(layer.mlp.gate.weight.numel() for layer in moe.model.language_model.layers)
    total = sum(p.numel() for p in moe.parameters())
    assert total == dense_params + expert_params * 3 // 4 + router_params


def test_moe_training_loss_includes_the_load_balancing_term(real_proteins, protein_tokenizer):
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config(num_experts=4, num_experts_per_tok=1, router_aux_loss_coef=0.5))
    batch = protein_batch(real_proteins[:2], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    labels = ids.masked_fill(mask == 0, -100)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels, **batch, output_router_logits=False)
    with_aux = model(input_ids=ids, attention_mask=mask, labels=labels, **batch, output_router_logits=True)
    torch.testing.assert_close(with_aux.loss, plain.loss + 0.5 * with_aux.aux_loss)
    with_aux.loss.backward()
    assert model.model.language_model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_save_and_load_round_trip(model, real_proteins, protein_tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    batch = protein_batch(real_proteins, protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    for auto in (AutoModel, AutoModelForCausalLM, SepitForConditionalGeneration):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, SepitForConditionalGeneration)
        with torch.no_grad():
            assert torch.equal(
                loaded(input_ids=ids, attention_mask=mask, **batch).logits,
                model(input_ids=ids, attention_mask=mask, **batch).logits,
            )


REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_sepit"] = None  # the package must not be importable: only the folder's own code
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    folder, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path, weights_only=True)
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"logits": logits}, out_path)
    """
)


def test_remote_code_load_in_a_fresh_process(model, real_proteins, protein_tokenizer, tmp_path):
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    batch = protein_batch(real_proteins, protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    inputs = {"input_ids": ids, "attention_mask": mask, **batch}
    torch.save(inputs, tmp_path / "inputs.pt")
    run_in_fresh_python(
        REMOTE_CODE_CHECK, [str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], tmp_path
    )
    remote = torch.load(tmp_path / "out.pt", weights_only=True)["logits"]
    with torch.no_grad():
        assert torch.equal(remote, model(**inputs).logits)


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level LLM tokenizer of `size` tokens (ids 0-2: <unk>, <s>, </s>)."""
    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(size - 3))]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize(
    "tokens, protein_id, vocab_size",
    [(100, 100, 101), (40, 40, 100)],  # 40: the LLM has more embedding rows than tokens, as Qwen2 checkpoints do
)
def test_from_pretrained_parts_loads_both_checkpoints(tmp_path, protein_tokenizer, tokens, protein_id, vocab_size):
    torch.manual_seed(0)
    config = tiny_config()
    esm = EsmModel(config.protein_config, add_pooling_layer=False)
    esm.save_pretrained(tmp_path / "esm")
    protein_tokenizer.save_pretrained(tmp_path / "esm")
    llm = LlamaForCausalLM(LlamaConfig(**config.text_config.to_dict()))
    llm.save_pretrained(tmp_path / "llm")
    word_tokenizer(tokens).save_pretrained(tmp_path / "llm")
    model = SepitForConditionalGeneration.from_pretrained_parts(
        str(tmp_path / "esm"), str(tmp_path / "llm"), num_gaussian_kernels=8, protein_pooling=2
    )
    processor = SepitProcessor.from_pretrained_parts(str(tmp_path / "esm"), str(tmp_path / "llm"), protein_pooling=2)
    assert model.config.protein_token_id == processor.protein_token_id == protein_id
    assert model.config.text_config.vocab_size == vocab_size
    assert model.config.num_gaussian_kernels == 8 and model.config.protein_pooling == 2
    assert torch.equal(
        model.model.protein_model.encoder.layer[0].attention.self.query.weight,
        esm.encoder.layer[0].attention.self.query.weight,
    )
    assert torch.equal(model.lm_head.weight[:100], llm.lm_head.weight)
    assert not any(p.is_meta for p in model.parameters())
    inputs = processor(text="w1 w2 <protein> w3", proteins="MKTAYIAKQR")
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    model.save_pretrained(tmp_path / "sepit")
    reloaded = SepitForConditionalGeneration.from_pretrained(tmp_path / "sepit").config
    assert reloaded.protein_token_id == protein_id and reloaded.protein_pooling == 2


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_any_causal_lm_config(model_type, real_proteins, protein_tokenizer):
    text = tiny_config().text_config.to_dict()
    text["model_type"] = model_type
    model = SepitForConditionalGeneration(tiny_config(text_config=text, num_experts=2)).eval()
    assert type(model.model.language_model).__name__.lower().startswith(model_type)
    batch = protein_batch(real_proteins[1:2], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, **batch).logits.shape[1] == ids.shape[1]


def test_config_moe_fields_live_on_the_text_config():
    config = tiny_config(num_experts=4, num_experts_per_tok=2)
    text = config.get_text_config()
    assert (text.num_experts, text.num_experts_per_tok, text.norm_topk_prob) == (4, 2, True)
    reloaded = SepitConfig.from_dict(config.to_dict())
    assert reloaded.num_experts == 4 and reloaded.get_text_config().num_experts_per_tok == 2
    assert tiny_config().get_text_config().num_experts is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"protein_feature_layer": 7}, "protein_feature_layer"),
        ({"num_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"num_gaussian_kernels": 0}, "num_gaussian_kernels"),
        ({"protein_pooling": 0}, "protein_pooling"),
        ({"protein_pooling": 2, "original_compat": True}, "protein_pooling"),
    ],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def extra_protein_tag(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    return torch.cat([ids, torch.full((ids.shape[0], 1), PROTEIN_TOKEN_ID)], 1), batch


def coords_2d(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    return ids, {**batch, "protein_coords": batch["protein_coords"][..., :2]}


def nan_where_present(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    coords = batch["protein_coords"].clone()
    coords[0, 3, 1] = float("nan")
    return ids, {**batch, "protein_coords": coords}


def inf_where_present(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    coords = batch["protein_coords"].nan_to_num()
    coords[1, 4, 0] = float("inf")
    return ids, {**batch, "protein_coords": coords}


def short_attention_mask(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    return ids, {**batch, "protein_attention_mask": batch["protein_attention_mask"][:, :-1]}


def short_coords_mask(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    return ids, {**batch, "protein_coords_mask": batch["protein_coords_mask"][:, :-1]}


def flat_protein_ids(ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    return ids, {"protein_input_ids": batch["protein_input_ids"][0]}


@pytest.mark.parametrize(
    "mutate, field",
    [
        (extra_protein_tag, "<protein>"),
        (coords_2d, "protein_coords must have shape"),
        (nan_where_present, "NaN/inf at protein 0, position 3"),
        (inf_where_present, "NaN/inf at protein 1, position 4"),
        (short_attention_mask, "protein_attention_mask"),
        (short_coords_mask, "protein_coords_mask"),
        (flat_protein_ids, "protein_input_ids"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_field(model, real_proteins, protein_tokenizer, mutate, field):
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, _ = pad(prompt_ids(feature_counts(batch)), "right")
    ids, batch = mutate(ids, batch)
    with pytest.raises(ValueError, match=re.escape(field)):
        model(input_ids=ids, **batch)


def test_protein_tags_without_proteins_raise(model):
    with pytest.raises(ValueError, match="protein_input_ids"):
        model(input_ids=torch.tensor([[1, PROTEIN_TOKEN_ID, 5]]))


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(real_proteins, protein_tokenizer, checkpointing):
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config(num_experts=2, structure_embedding_scale=0.1)).train()
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    labels = ids.masked_fill((mask == 0) | (ids == PROTEIN_TOKEN_ID), -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **batch, output_router_logits=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    # Reentrant checkpointing drops the gradient of keyword tensors: the ESM layers get the structure bias as one.
    model.activation_checkpointing_enable(checkpointing)
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("structure_module" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_trl_fused_lm_head_sees_the_spliced_sequence_and_the_router_loss(real_proteins, protein_tokenizer):
    """TRL's SFTTrainer trains through `model.base_model(**inputs)` and the output embeddings, not `forward`."""
    add_fused_lm_head = pytest.importorskip("trl.trainer.utils").add_fused_lm_head
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config(num_experts=2, router_aux_loss_coef=0.1))
    model.config.get_text_config().output_router_logits = True
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    labels = ids.masked_fill((mask == 0) | (ids == PROTEIN_TOKEN_ID), -100)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels, **batch, output_router_logits=True)
    add_fused_lm_head(model)
    fused = model(input_ids=ids, attention_mask=mask, labels=labels, **batch, fused_lm_head=True)
    # TRL's balancing loss pools the layers; SepitSFTTrainer replaces it by the model's per-layer one.
    torch.testing.assert_close(fused.aux_loss, load_balancing_loss_func(ours.router_logits, 2, 1, mask))
    language_model_loss = ours.loss - 0.1 * ours.aux_loss
    torch.testing.assert_close(fused.loss - 0.1 * fused.aux_loss, language_model_loss, atol=1e-5, rtol=1e-5)


def with_pooling(model: SepitForConditionalGeneration, pooling: int) -> SepitForConditionalGeneration:
    """The fixture model's weights under another `protein_pooling` (pooling has no parameters of its own)."""
    config = SepitConfig.from_dict(model.config.to_dict() | {"protein_pooling": pooling})
    pooled = SepitForConditionalGeneration(config).eval()
    pooled.load_state_dict(model.state_dict())
    return pooled


def pooled_counts(counts: list[int], pooling: int) -> list[int]:
    return [math.ceil(count / pooling) for count in counts]


def group_means(states: torch.Tensor, counts: list[int], pooling: int) -> torch.Tensor:
    """Reference pooling: per protein, the mean of each run of `pooling` rows; the last run may be shorter."""
    means, start = [], 0
    for count in counts:
        end = start + count
        means += [states[first : min(first + pooling, end)].mean(0) for first in range(start, end, pooling)]
        start = end
    return torch.stack(means)


@pytest.mark.parametrize("with_coords", [True, False])
@pytest.mark.parametrize("pooling", [1, 2, 3])
def test_spliced_features_are_projected_group_means(model, real_proteins, protein_tokenizer, pooling, with_coords):
    batch = protein_batch(real_proteins, protein_tokenizer, with_coords=with_coords)
    counts = feature_counts(batch)  # 131, 53, 28: every k in (2, 3) leaves a shorter last group somewhere
    projector_inputs = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda _m, args: projector_inputs.append(args[0])
    )
    try:
        with torch.no_grad():
            model.model.get_protein_features(**batch)
    finally:
        hook.remove()
    with torch.no_grad():
        expected = model.model.multi_modal_projector(group_means(projector_inputs[0], counts, pooling))

    pooled = model if pooling == 1 else with_pooling(model, pooling)
    ids, mask = pad(prompt_ids(pooled_counts(counts, pooling)), "right")
    llm_inputs = []
    hook = pooled.model.language_model.register_forward_pre_hook(
        lambda _m, _args, kwargs: llm_inputs.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = pooled(input_ids=ids, attention_mask=mask, **batch)
    finally:
        hook.remove()
    spliced = llm_inputs[0][ids == PROTEIN_TOKEN_ID]
    if pooling == 1:
        assert torch.equal(spliced, expected) and torch.equal(out.protein_features, expected)
    else:
        torch.testing.assert_close(spliced, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.protein_features, expected, atol=1e-6, rtol=1e-5)
    assert llm_inputs[0].shape[1] == ids.shape[1] and out.logits.shape[1] == ids.shape[1]


def test_pooled_model_trains_through_the_encoder(model, real_proteins, protein_tokenizer):
    pooled = with_pooling(model, 3).train()
    batch = protein_batch(real_proteins, protein_tokenizer)
    ids, mask = pad(prompt_ids(pooled_counts(feature_counts(batch), 3)), "right")
    labels = ids.masked_fill((mask == 0) | (ids == PROTEIN_TOKEN_ID), -100)
    pooled(input_ids=ids, attention_mask=mask, labels=labels, **batch).loss.backward()
    for module in (pooled.model.protein_model.encoder.layer[0], pooled.model.structure_module):
        assert all(p.grad is not None for p in module.parameters())
    assert pooled.model.protein_model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_pooled_greedy_generation_batched_equals_one_by_one(model, real_proteins, protein_tokenizer):
    pooled = with_pooling(model, 2)
    # Left padding, KV cache, a prompt with two proteins; 131 and 53 positions end in a 1-position group.
    groups = [[real_proteins[0]], [real_proteins[1], real_proteins[2]]]
    rows = []
    for group, (start, end) in zip(groups, [(5, 6), (7, 8)], strict=True):
        tokens = pooled_counts(feature_counts(protein_batch(group, protein_tokenizer)), 2)
        row = [1, start]
        for count in tokens:
            row += [PROTEIN_TOKEN_ID] * count + [end]
        rows.append(row)
    ids, mask = pad(rows, "left")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
    batch = protein_batch([protein for group in groups for protein in group], protein_tokenizer)
    with torch.no_grad():
        together = pooled.generate(input_ids=ids, attention_mask=mask, **batch, **settings)[:, ids.shape[1] :]
        for i, (row, group) in enumerate(zip(rows, groups, strict=True)):
            single = protein_batch(group, protein_tokenizer)
            alone = pooled.generate(input_ids=torch.tensor([row]), **single, **settings)[:, len(row) :]
            assert torch.equal(together[i], alone[0]), i


def test_unpooled_inputs_to_a_pooled_model_raise_naming_the_fields(model, real_proteins, protein_tokenizer):
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "right")
    with pytest.raises(ValueError, match=r"`<protein>` tokens .* protein_pooling=2"):
        with_pooling(model, 2)(input_ids=ids, attention_mask=mask, **batch)


# transformers' model contract: what LLaVA and Llama accept, SEPIT accepts with the same meaning (or refuses by name).


@pytest.fixture
def prompt(model, real_proteins, protein_tokenizer) -> dict:
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, mask = pad(prompt_ids(feature_counts(batch)), "left")
    return {"input_ids": ids, "attention_mask": mask, **batch}


def one_request(prompt: dict) -> dict:
    """The first row of `prompt`, unpadded (assisted decoding takes batches of one)."""
    keep = prompt["attention_mask"][0].bool()
    return {
        "input_ids": prompt["input_ids"][:1, keep],
        "attention_mask": prompt["attention_mask"][:1, keep],
        **{k: v[:1] for k, v in prompt.items() if k.startswith("protein_")},
    }


def test_return_dict_false_gives_the_output_as_a_tuple(model, prompt):
    with torch.no_grad():
        output = model(**prompt)
        as_tuple = model(**prompt, return_dict=False)
        base = model.model(**prompt, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.logits)
    assert isinstance(base, tuple) and base[0].shape[:2] == prompt["input_ids"].shape


def test_precomputed_protein_features_replace_the_encoder(model, prompt):
    proteins = {k: v for k, v in prompt.items() if k.startswith("protein_")}
    text = {k: v for k, v in prompt.items() if not k.startswith("protein_")}
    with torch.no_grad():
        features = model.get_protein_features(**proteins, return_dict=True)
        assert [len(f) for f in features.pooler_output] == feature_counts(proteins)
        assert torch.equal(torch.cat(features.pooler_output), model.get_protein_features(**proteins))
        expected = model(**prompt).logits
        assert torch.equal(model(**text, mm_encoder_outputs={"protein": features}).logits, expected)
        greedy = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        calls = []
        hook = model.model.protein_model.register_forward_hook(lambda *_: calls.append(1))
        try:
            again = model.generate(**text, mm_encoder_outputs={"protein": features}, max_new_tokens=6, do_sample=False)
        finally:
            hook.remove()
    assert torch.equal(again, greedy) and not calls  # the encoder ran once, for the features, not per question
    with pytest.raises(ValueError, match="either as `protein_input_ids` or as `mm_encoder_outputs`"):
        model(**prompt, mm_encoder_outputs={"protein": features})
    short = BaseModelOutputWithPooling(pooler_output=features.pooler_output[:1])
    with pytest.raises(ValueError, match=r"mm_encoder_outputs\['protein'\] give"):
        model(**text, mm_encoder_outputs={"protein": short})


def test_inputs_embeds_with_proteins_as_llava_does(model, prompt):
    """With `inputs_embeds`, the placeholders are found by their embedding, in `forward` and in `generate`."""
    embeds = model.get_input_embeddings()(prompt["input_ids"])
    rest = {k: v for k, v in prompt.items() if k != "input_ids"}
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds, **rest).logits, model(**prompt).logits)
        greedy = model.generate(**prompt, max_new_tokens=5, do_sample=False)[:, prompt["input_ids"].shape[1] :]
        from_embeds = model.generate(inputs_embeds=embeds, **rest, max_new_tokens=5, do_sample=False)
    assert torch.equal(from_embeds, greedy)  # `generate(inputs_embeds=...)` returns the new tokens only


def test_inputs_embeds_without_proteins_are_used_as_given(model, prompt):
    """Embeddings the caller built, protein features already in place, generate as they are (as LLaVA's do); the same
    prompt as ids with placeholders and no proteins is refused."""
    rest = {k: v for k, v in prompt.items() if k in ("attention_mask",)}
    with torch.no_grad():
        features = model.get_protein_features(**{k: v for k, v in prompt.items() if k.startswith("protein_")})
        embeds = model.get_input_embeddings()(prompt["input_ids"])
        placeholder = (prompt["input_ids"] == PROTEIN_TOKEN_ID).unsqueeze(-1)
        embeds = embeds.masked_scatter(placeholder, features.to(embeds.dtype))
        spliced = model(inputs_embeds=embeds, **rest).logits
        torch.testing.assert_close(spliced, model(**prompt).logits)
        with pytest.raises(ValueError, match="no `protein_input_ids` were given"):
            model(input_ids=prompt["input_ids"], **rest)


def test_past_key_values_is_the_cache(model, prompt):
    step = torch.full((prompt["input_ids"].shape[0], 1), 5)
    mask = torch.cat([prompt["attention_mask"], torch.ones_like(step)], dim=1)
    with torch.no_grad():
        by_cache = model(input_ids=step, attention_mask=mask, cache=model(**prompt, use_cache=True).cache).logits
        by_old_name = model(
            input_ids=step, attention_mask=mask, past_key_values=model(**prompt, use_cache=True).cache
        ).logits
        recomputed = model(
            input_ids=torch.cat([prompt["input_ids"], step], dim=1),
            attention_mask=mask,
            **{k: v for k, v in prompt.items() if k.startswith("protein_")},
        ).logits[:, -1:]
    assert torch.equal(by_old_name, by_cache)
    torch.testing.assert_close(by_cache, recomputed, atol=1e-5, rtol=1e-5)


def test_assisted_decoding_with_a_sepit_assistant_and_refusal_of_a_plain_llm(model, prompt):
    request = one_request(prompt)
    torch.manual_seed(1)
    assistant = SepitForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        greedy = model.generate(**request, max_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(**request, max_new_tokens=8, do_sample=False, assistant_model=model), greedy)
        assert torch.equal(
            model.generate(**request, max_new_tokens=8, do_sample=False, assistant_model=assistant), greedy
        )
        plain = LlamaForCausalLM(model.config.text_config).eval()
        with pytest.raises(ValueError, match="assistant_model: a LlamaForCausalLM cannot read"):
            model.generate(**request, max_new_tokens=8, assistant_model=plain)


def test_generation_never_emits_the_protein_placeholder(prompt):
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config()).eval()
    boost = torch.zeros(model.config.text_config.vocab_size)
    boost[PROTEIN_TOKEN_ID] = 1e4  # the model now wants nothing but `<protein>`
    model.lm_head.register_forward_hook(lambda _module, _args, logits: logits + boost)
    with torch.no_grad():
        for use_cache in (True, False):
            new = model.generate(**prompt, max_new_tokens=4, do_sample=False, use_cache=use_cache)
            assert not (new[:, prompt["input_ids"].shape[1] :] == PROTEIN_TOKEN_ID).any()
        # The original release could emit it (embedded as text); `suppress_tokens=[]` asks for that behaviour.
        new = model.generate(**prompt, max_new_tokens=4, do_sample=False, suppress_tokens=[])
        assert (new[:, prompt["input_ids"].shape[1] :] == PROTEIN_TOKEN_ID).all()


def test_flex_attention_for_the_llm_and_a_clear_refusal_where_the_bias_cannot_go(model, prompt):
    sequences_only = {k: v for k, v in prompt.items() if "coords" not in k}
    flex_llm = SepitForConditionalGeneration._from_config(
        copy.deepcopy(model.config), attn_implementation={"text_config": "flex_attention", "protein_config": "sdpa"}
    ).eval()
    flex_everywhere = SepitForConditionalGeneration._from_config(
        copy.deepcopy(model.config), attn_implementation="flex_attention"
    )
    flex_llm.load_state_dict(model.state_dict())
    flex_everywhere.eval().load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(flex_llm(**prompt).logits, model(**prompt).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            flex_everywhere(**sequences_only).logits, model(**sequences_only).logits, atol=1e-5, rtol=1e-5
        )
        with pytest.raises(ValueError, match=r"protein_coords: the structure bias .* 'flex_attention'"):
            flex_everywhere(**prompt)
    with pytest.raises(ImportError, match="FlashAttention2"):  # accepted by SEPIT; the package is absent here
        SepitForConditionalGeneration._from_config(copy.deepcopy(model.config), attn_implementation="flash_attention_2")


def test_compiled_forward_has_no_graph_break(model, prompt):
    with torch.no_grad():
        prefill = torch._dynamo.explain(model)(**prompt)
        cache = model(**prompt, use_cache=True).cache
        step = torch.full((prompt["input_ids"].shape[0], 1), 5)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(step)], dim=1)
        decode = torch._dynamo.explain(model)(input_ids=step, attention_mask=mask, cache=cache)
        compiled = torch.compile(model)(**prompt).logits
        assert torch.allclose(compiled, model(**prompt).logits, atol=1e-5)
    torch._dynamo.reset()
    assert (prefill.graph_break_count, decode.graph_break_count) == (0, 0), prefill.break_reasons


def test_every_parameter_gets_a_gradient(prompt):
    """No unused parameters (DDP needs no `find_unused_parameters`): the ESM layers above the projected one, the final
    norm and the contact head are not kept."""
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config(structure_embedding_scale=0.1)).train()
    labels = prompt["input_ids"].masked_fill(prompt["input_ids"] == PROTEIN_TOKEN_ID, -100)
    model(**prompt, labels=labels).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert len(model.model.protein_model.encoder.layer) == model.config.protein_config.num_hidden_layers - 1
    assert model.input_modalities == ("protein", "text")


STANDARD_PAIR_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_sepit"] = None  # only the folder's own code
    from transformers import pipeline
    folder = sys.argv[1]
    qa = pipeline("protein-qa", model=folder, trust_remote_code=True)
    assert type(qa).__module__.startswith("transformers_modules"), type(qa).__module__
    print(json.dumps(qa({"question": "What is <protein> ?", "sequence": "MKTAYIAKQR"}, max_new_tokens=4)))
    """
)


def test_the_standard_save_pretrained_pair_builds_its_own_pipeline(tmp_path, tiny_parts):
    """`model.save_pretrained` + `processor.save_pretrained` (also of a PEFT-merged model) give a folder that loads in
    `pipeline("protein-qa", trust_remote_code=True)` in a process without this package."""
    from peft import LoraConfig, get_peft_model

    processor = SepitProcessor.from_pretrained_parts(tiny_parts / "protein_model", tiny_parts / "language_model")
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model"
    )
    merged = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).merge_and_unload()
    for name, candidate in (("plain", model), ("merged", merged)):
        folder = tmp_path / name
        candidate.save_pretrained(folder)
        processor.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert (
            config["custom_pipelines"]["protein-qa"]["impl"] == "pipeline_protein_qa.ProteinQuestionAnsweringPipeline"
        )
        assert (folder / "pipeline_protein_qa.py").is_file()
        answer = json.loads(run_in_fresh_python(STANDARD_PAIR_CHECK, [str(folder)], tmp_path).splitlines()[-1])
        assert isinstance(answer[0]["answer"], str)


def test_push_to_hub_uploads_the_pipeline_code_with_the_model(model, tmp_path):
    """`model.push_to_hub` saves through `save_pretrained` into a temporary folder: the upload (patched at the network
    boundary) holds the remote code, the `protein-qa` pipeline code and `custom_pipelines`."""
    uploaded = tmp_path / "uploaded"

    def capture(self, folder, repo_id, **kwargs):
        shutil.copytree(folder, uploaded)
        return f"https://huggingface.co/{repo_id}/commit/0"

    with (
        mock.patch("transformers.utils.hub.hf_api") as api,
        mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=ModelCard("")),
        mock.patch.object(PushToHubMixin, "_upload_modified_files", capture),
    ):
        api.return_value.create_repo.return_value.repo_id = "me/sepit"
        model.push_to_hub("me/sepit")
    assert {"config.json", "model.safetensors", "modeling_sepit.py", "pipeline_protein_qa.py"} <= {
        path.name for path in uploaded.iterdir()
    }
    assert "protein-qa" in json.loads((uploaded / "config.json").read_text())["custom_pipelines"]


@pytest.mark.parametrize("built", ["from_config", "upcycled"])
def test_moe_parallel_plan_router_init_and_router_logits_from_config(prompt, built):
    torch.manual_seed(0)
    if built == "from_config":
        model = SepitForConditionalGeneration(tiny_config(num_experts=2)).eval()
    else:
        dense = SepitForConditionalGeneration(tiny_config()).eval()
        # A dense LLM has no router logits to output (TRL then refuses a router_aux_loss_coef for it); upcycling
        # gives the flag, off by default.
        assert not hasattr(dense.config.text_config, "output_router_logits")
        model = dense.upcycle_to_moe(num_experts=2)
    assert model.config.text_config.output_router_logits is False
    names = [name for name, _ in model.named_modules()]
    for pattern in model.tp_plan:  # every tensor-parallel entry names modules that exist (the experts' projections)
        regex = re.compile(pattern.replace(".", r"\.").replace("*", r"\d+"))
        assert any(regex.fullmatch(name) for name in names), pattern
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    router = model.model.language_model.layers[0].mlp.gate
    router.weight.data.zero_()
    router._is_hf_initialized = False
    model.model.language_model._initialize_weights(router)  # what transformers runs for weights a checkpoint lacks
    assert router.weight.std() > 0
    model.config.text_config.output_router_logits = True
    with torch.no_grad():
        routed = model.model(**prompt)
    assert len(routed.router_logits) == model.config.text_config.num_hidden_layers


def test_sequence_only_ablation_has_no_structure_module(prompt, tmp_path, caplog):
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config(sequence_only=True)).eval()
    assert model.model.structure_module is None
    assert not any("structure_module" in name for name, _ in model.named_parameters())
    sequences_only = {k: v for k, v in prompt.items() if "coords" not in k}
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits, model(**sequences_only).logits)
    assert "ignores protein coordinates" in caplog.text
    model.save_pretrained(tmp_path)
    reloaded = SepitForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.sequence_only and reloaded.model.structure_module is None
    with pytest.raises(ValueError, match="sequence_only=True needs original_compat=False"):
        tiny_config(sequence_only=True, original_compat=True)


RESAVE_CHECK = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["modeling_sepit"] = None  # only the folder's own code, from transformers' module cache
    from transformers import AutoModel, AutoProcessor, pipeline
    folder, again = sys.argv[1:]
    AutoModel.from_pretrained(folder, trust_remote_code=True).save_pretrained(again)
    AutoProcessor.from_pretrained(folder, trust_remote_code=True).save_pretrained(again)
    assert os.path.isfile(os.path.join(again, "pipeline_protein_qa.py"))
    qa = pipeline("protein-qa", model=again, trust_remote_code=True)
    print(json.dumps(qa({"question": "What is <protein> ?", "sequence": "MKTAYIAKQR"}, max_new_tokens=2)))
    """
)


def test_a_remote_code_model_saved_again_keeps_its_pipeline(tmp_path, tiny_parts):
    """Loaded with `trust_remote_code` (the module cache holds only the modeling code), the model finds the pipeline
    code in the folder it came from, so a fine-tuned copy saved again still builds its pipeline."""
    processor = SepitProcessor.from_pretrained_parts(tiny_parts / "protein_model", tiny_parts / "language_model")
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tiny_parts / "protein_model", tiny_parts / "language_model"
    )
    model.save_pretrained(tmp_path / "first")
    processor.save_pretrained(tmp_path / "first")
    output = run_in_fresh_python(RESAVE_CHECK, [str(tmp_path / "first"), str(tmp_path / "again")], tmp_path)
    assert isinstance(json.loads(output.splitlines()[-1])[0]["answer"], str)
    assert "protein-qa" in json.loads((tmp_path / "again" / "config.json").read_text())["custom_pipelines"]
