"""Sparse mixture of experts for the LLM feed-forwards, and upcycling a dense LLM into it (SEPIT stage 2)."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig


class SepitTopKRouter(nn.Module):
    """Softmax router over experts; its logits are recorded for the load-balancing loss.

    With `norm_topk_prob` the chosen experts' weights are renormalised to sum to 1, so an upcycled model computes what
    its dense parent did. At top-1 that weight is the constant 1, which would leave the router without any gradient
    from the language-model loss: it is made a straight-through scale, whose value is exactly 1 and whose gradient is
    that of the raw top-1 probability (the original's Switch-style weighting, `norm_topk_prob=False`)."""

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
        top_probs, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_weights = top_probs
        if self.norm_topk_prob:
            top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
            if self.top_k == 1:
                top_weights = top_weights + (top_probs - top_probs.detach())  # + 0 in value, d/dp = 1 in gradient
        return router_logits, top_weights, top_index


def expert_capacity(tokens: int, config: PreTrainedConfig, training: bool) -> int | None:
    """How many (token, slot) assignments an expert takes, as DeepSpeed's gating computes it:
    ceil(top_k * tokens / num_experts * factor), at least `expert_min_capacity`; None without a factor (no dropping).
    The original trains at 1.25 and evaluates at 2.0."""
    factor = getattr(config, "expert_capacity_factor" if training else "expert_eval_capacity_factor", None)
    if factor is None:
        return None
    capacity = math.ceil(config.num_experts_per_tok * tokens / config.num_experts * factor)
    return max(capacity, getattr(config, "expert_min_capacity", 4) or 0)


def within_capacity(expert_ids: torch.Tensor, top_k: int, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments (token-major, `top_k` per token) an expert keeps: every token's first choice before any
    second choice, then in token order (DeepSpeed's rule without random token selection); the rest are dropped (the
    token's residual stream passes them through unchanged)."""
    assignments = expert_ids.numel()
    position = torch.arange(assignments, device=expert_ids.device)
    priority = (position % top_k) * (assignments // top_k) + torch.div(position, top_k, rounding_mode="floor")
    order = torch.argsort(expert_ids * assignments + priority)
    # scatter_add, not bincount: its output has num_experts entries whatever the ids (a static shape under compile)
    counts = torch.zeros(num_experts, dtype=position.dtype, device=position.device).scatter_add_(
        0, expert_ids, torch.ones_like(position)
    )
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(position)
    rank[order] = position - starts[expert_ids[order]]
    return rank < capacity


class SepitSparseMoeBlock(nn.Module):
    """`num_experts` copies of a gated MLP (`gate_proj/up_proj/down_proj`) with top-k routing, as in Mixtral, and an
    optional expert capacity (DeepSpeed's), beyond which assignments are dropped."""

    def __init__(self, config: PreTrainedConfig, dense_mlp: nn.Module):
        super().__init__()
        self.config = config
        self.gate = SepitTopKRouter(config)
        self.experts = nn.ModuleList(copy.deepcopy(dense_mlp) for _ in range(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, top_weights, top_index = self.gate(hidden_states)
        top_k = top_index.shape[1]
        expert_ids, weights = top_index.flatten(), top_weights.flatten()
        token_ids = torch.div(torch.arange(expert_ids.numel(), device=expert_ids.device), top_k, rounding_mode="floor")
        capacity = expert_capacity(hidden_states.shape[0], self.config, self.training)
        if torch.compiler.is_compiling():
            return self._dense_forward(hidden_states, expert_ids, weights, token_ids, capacity).reshape(
                batch_size, sequence_length, hidden_dim
            )
        if capacity is not None:
            keep = within_capacity(expert_ids, top_k, len(self.experts), capacity)
            expert_ids, weights, token_ids = expert_ids[keep], weights[keep], token_ids[keep]
        # Every (token, slot) sorted by expert once: one gather in and one scatter out for all experts together,
        # instead of a mask, a gather and a scatter per expert (at small widths those dominated the step).
        order = torch.argsort(expert_ids, stable=True)
        token_ids = token_ids[order]
        counts = torch.bincount(expert_ids, minlength=len(self.experts)).tolist()
        routed = hidden_states[token_ids].split(counts)
        output = torch.zeros_like(hidden_states)
        if token_ids.numel():
            expert_out = torch.cat(
                [expert(part) for expert, part, count in zip(self.experts, routed, counts, strict=True) if count]
            )
            expert_out = expert_out * weights[order, None].to(expert_out.dtype)
            output = output.index_add(0, token_ids, expert_out.to(hidden_states.dtype))
        return output.reshape(batch_size, sequence_length, hidden_dim)

    def _dense_forward(
        self,
        hidden_states: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        token_ids: torch.Tensor,
        capacity: int | None,
    ) -> torch.Tensor:
        """The same sum with static shapes, for torch.compile: every expert runs on every token and is weighted by its
        routing weight, 0 where the token is not routed to it (or dropped beyond capacity). Splitting tokens per expert
        needs their counts on the host, which a full graph cannot have; the price is num_experts x the FFN compute."""
        if capacity is not None:
            weights = weights * within_capacity(expert_ids, self.gate.top_k, len(self.experts), capacity)
        routing = weights.new_zeros(hidden_states.shape[0], len(self.experts)).index_put(
            (token_ids, expert_ids), weights, accumulate=True
        )
        output = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self.experts):
            output = output + expert(hidden_states) * routing[:, index, None].to(hidden_states.dtype)
        return output


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The Switch Transformer's balancing loss of each MoE layer, num_experts * sum_e(f_e * P_e) (f_e: the fraction of
    tokens routed to expert e, P_e: its mean router probability), summed over layers, as the original SEPIT computes
    it. transformers' `load_balancing_loss_func` pools the layers first, so that two layers collapsing onto different
    experts would look balanced. Padding positions (`attention_mask == 0`) are left out."""
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).float()  # (tokens, top_k, E)
        if attention_mask is not None and attention_mask.numel() == logits.shape[0]:
            weight = attention_mask.reshape(-1).to(probs.dtype)
            count = weight.sum().clamp(min=1)
            fraction = (chosen * weight[:, None, None]).sum(0) / count
            mean_prob = (probs * weight[:, None]).sum(0) / count
        else:
            fraction, mean_prob = chosen.mean(0), probs.mean(0)
        total = total + num_experts * (fraction * mean_prob[None, :]).sum()
    return total


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
    "expert_capacity",
    "load_balancing_loss",
    "plan_experts",
    "within_capacity",
]
