"""Sparse mixture of experts for the LLM feed-forwards, and upcycling a dense LLM into it (SEPIT stage 2)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig


class SepitTopKRouter(nn.Module):
    """Softmax router over experts; its logits are recorded for the load-balancing loss."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Initialised here: inside the LLM backbone, transformers applies the backbone's own init, which skips routers.
        nn.init.normal_(self.weight, std=getattr(config, "initializer_range", 0.02))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(router_logits.float(), dim=-1)
        top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_weights, top_index


class SepitSparseMoeBlock(nn.Module):
    """`num_experts` copies of a gated MLP (`gate_proj/up_proj/down_proj`) with top-k routing, as in Mixtral."""

    def __init__(self, config: PreTrainedConfig, dense_mlp: nn.Module):
        super().__init__()
        self.gate = SepitTopKRouter(config)
        self.experts = nn.ModuleList(copy.deepcopy(dense_mlp) for _ in range(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, top_weights, top_index = self.gate(hidden_states)
        # Every (token, slot) sorted by expert once: one gather in and one scatter out for all experts together,
        # instead of a mask, a gather and a scatter per expert (at small widths those dominated the step).
        expert_ids = top_index.flatten()
        order = torch.argsort(expert_ids, stable=True)
        token_ids = torch.div(order, top_index.shape[1], rounding_mode="floor")
        counts = torch.bincount(expert_ids, minlength=len(self.experts)).tolist()
        routed = hidden_states[token_ids].split(counts)
        expert_out = torch.cat(
            [expert(part) for expert, part, count in zip(self.experts, routed, counts, strict=True) if count]
        )
        expert_out = expert_out * top_weights.flatten()[order, None].to(expert_out.dtype)
        output = torch.zeros_like(hidden_states).index_add_(0, token_ids, expert_out.to(hidden_states.dtype))
        return output.reshape(batch_size, sequence_length, hidden_dim)


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal-LM backbone (Llama, Qwen2, Mistral, ...)."""
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(language_model).__name__} has no `layers` list: cannot place experts in its FFNs")
    return layers


def check_gated_mlp(mlp: nn.Module) -> None:
    missing = [name for name in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, name)]
    if missing:
        raise ValueError(
            f"{type(mlp).__name__} lacks {missing}: only Llama-style gated MLPs (gate_proj/up_proj/down_proj) can be "
            "turned into experts"
        )


def build_moe_layers(language_model: nn.Module, text_config: PreTrainedConfig) -> None:
    """Replace every FFN by an (uninitialised-router) MoE block: the layout of an MoE checkpoint before loading. The
    backbone's tensor-parallel plan then names each expert's projections instead of the FFN's."""
    for layer in decoder_layers(language_model):
        check_gated_mlp(layer.mlp)
        layer.mlp = SepitSparseMoeBlock(text_config, layer.mlp)
    plan_experts(language_model)


def plan_experts(language_model: nn.Module) -> None:
    """Point the backbone's tensor-parallel plan at each expert's projections instead of the replaced FFN's."""
    plan = getattr(language_model, "_tp_plan", None) or {}
    language_model._tp_plan = {key.replace(".mlp.", ".mlp.experts.*."): value for key, value in plan.items()}


__all__ = [
    "SepitSparseMoeBlock",
    "SepitTopKRouter",
    "build_moe_layers",
    "check_gated_mlp",
    "decoder_layers",
    "plan_experts",
]
