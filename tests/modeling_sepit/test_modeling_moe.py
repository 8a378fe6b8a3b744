"""The mixture of experts: the router learns from the language-model loss at top-1 while an upcycled model still equals
its dense parent, the per-layer balancing loss, and DeepSpeed's expert capacity."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.modeling_moe import SepitSparseMoeBlock, expert_capacity, load_balancing_loss, within_capacity
from tests.conftest import PROTEIN_TOKEN_ID, pad, prompt_ids, protein_batch, tiny_config


def router_gradient(norm_topk_prob: bool, real_proteins, protein_tokenizer) -> float:
    """Norm of the routers' gradient from the language-model loss alone (no balancing loss) after upcycling."""
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config()).upcycle_to_moe(num_experts=4, norm_topk_prob=norm_topk_prob)
    batch = protein_batch(real_proteins[1:], protein_tokenizer)
    ids, mask = pad(prompt_ids(batch["protein_attention_mask"].sum(-1).tolist()), "right")
    labels = ids.masked_fill((mask == 0) | (ids == PROTEIN_TOKEN_ID), -100)
    model(input_ids=ids, attention_mask=mask, labels=labels, **batch, output_router_logits=False).loss.backward()
    routers = [layer.mlp.gate.weight.grad for layer in model.model.language_model.layers]
    return float(torch.stack([grad.norm() for grad in routers]).norm())


def test_top1_router_learns_from_the_lm_loss_as_the_originals_does(real_proteins, protein_tokenizer):
    renormalised = router_gradient(True, real_proteins, protein_tokenizer)
    raw = router_gradient(False, real_proteins, protein_tokenizer)  # the original's weighting
    assert renormalised > 0.1 * raw > 0


def test_straight_through_weight_is_exactly_one_at_top1():
    torch.manual_seed(0)
    config = tiny_config(num_experts=4).text_config
    block = SepitSparseMoeBlock(config, SepitForConditionalGeneration(tiny_config()).model.language_model.layers[0].mlp)
    _, weights, _ = block.gate(torch.randn(10, config.hidden_size))
    assert torch.equal(weights, torch.ones_like(weights)) and weights.requires_grad


def collapsed_router_logits(num_experts: int, tokens: int, experts_per_layer: list[int]) -> tuple[torch.Tensor, ...]:
    """One layer per entry, each sending every token to that expert."""
    layers = []
    for expert in experts_per_layer:
        logits = torch.full((tokens, num_experts), -20.0)
        logits[:, expert] = 20.0
        layers.append(logits)
    return tuple(layers)


def test_balancing_loss_is_per_layer_so_two_collapsed_layers_are_not_balanced():
    logits = collapsed_router_logits(4, 16, [0, 1])
    ours = load_balancing_loss(logits, num_experts=4, top_k=1)
    pooled = load_balancing_loss_func(logits, num_experts=4, top_k=1)
    torch.testing.assert_close(ours, torch.tensor(8.0))  # 4 per collapsed layer, summed
    torch.testing.assert_close(pooled, torch.tensor(2.0))  # transformers' pooled layers look balanced
    balanced = tuple(torch.zeros(16, 4) for _ in range(2))
    torch.testing.assert_close(load_balancing_loss(balanced, 4, 1), torch.tensor(2.0))  # 1 per balanced layer


def test_balancing_loss_leaves_padding_out():
    logits = collapsed_router_logits(4, 8, [0])[0]
    logits[4:] = torch.tensor([-20.0, 20.0, -20.0, -20.0])  # the padded half goes to expert 1
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    torch.testing.assert_close(load_balancing_loss((logits,), 4, 1, mask), torch.tensor(4.0))


def test_capacity_keeps_first_choices_then_token_order():
    # Six tokens, top-2 over 3 experts; expert 0 is everyone's choice: first choices of tokens 0, 1, 2, then 3 ...
    expert_ids = torch.tensor([0, 1, 0, 2, 0, 1, 0, 2, 1, 0, 2, 0])  # token-major: (token, slot) pairs
    keep = within_capacity(expert_ids, top_k=2, num_experts=3, capacity=3)
    first_slots_of_expert_0 = [0, 2, 4]  # tokens 0, 1, 2 chose it first
    assert keep[first_slots_of_expert_0].all() and not keep[6]  # token 3's first choice is over capacity
    assert not keep[9] and not keep[11]  # second choices of expert 0 come after every first choice
    assert keep[[1, 3, 5, 7, 8, 10]].all()  # experts 1 and 2 are within capacity


def test_dropped_tokens_pass_nothing_and_kept_ones_are_unchanged():
    torch.manual_seed(0)
    config = tiny_config(num_experts=2, expert_capacity_factor=0.5, expert_min_capacity=0).text_config
    dense = SepitForConditionalGeneration(tiny_config()).model.language_model.layers[0].mlp
    block = SepitSparseMoeBlock(config, dense).train()
    hidden = torch.randn(1, 8, config.hidden_size)
    assert expert_capacity(8, config, training=True) == math.ceil(1 * 8 / 2 * 0.5)
    with torch.no_grad():
        _, _, top_index = block.gate(hidden.reshape(8, -1))
        out = block(hidden)[0]
        expected = block.experts[0](hidden[0])  # every expert is a copy of the dense FFN
    kept = within_capacity(top_index.flatten(), 1, 2, 2)
    torch.testing.assert_close(out[kept], expected[kept])
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    block.eval()  # no evaluation factor: nothing dropped
    with torch.no_grad():
        torch.testing.assert_close(block(hidden)[0], expected)


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_capacity_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match="expert_capacity_factor must be > 0"):
        tiny_config(num_experts=2, expert_capacity_factor=factor)


@pytest.mark.parametrize(("top_k", "capacity_factor"), [(1, None), (2, 0.5)])
def test_the_block_compiles_to_one_graph_and_computes_the_same(top_k, capacity_factor):
    """Under torch.compile the block runs every expert on every token with routing weights (static shapes): no graph
    break, and the same output as the sparse eager path, with and without dropping beyond capacity."""
    torch.manual_seed(0)
    config = tiny_config(num_experts=4).text_config
    config.num_experts_per_tok, config.expert_capacity_factor, config.norm_topk_prob = top_k, capacity_factor, False
    block = SepitSparseMoeBlock(config, SepitForConditionalGeneration(tiny_config()).model.language_model.layers[0].mlp)
    with torch.no_grad():
        for expert in block.experts:  # distinct experts, so a token sent to the wrong one shows
            expert.down_proj.weight.normal_()
        hidden = torch.randn(2, 9, config.hidden_size)
        explained = torch._dynamo.explain(block)(hidden)
        compiled = torch.compile(block, fullgraph=True)(hidden)
        torch.testing.assert_close(compiled, block(hidden), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
