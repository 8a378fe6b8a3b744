"""SEPIT configuration: an ESM-2 protein encoder, its structure module, a projector and a causal LM."""

import dataclasses
import functools
import math
import re
import types
import typing

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError, StrictDataclassFieldValidationError
from transformers import CONFIG_MAPPING, AddedToken, AutoConfig, PreTrainedTokenizerBase
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

PROTEIN_TOKEN = "<protein>"


def add_protein_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `<protein>` in an LLM tokenizer, added as a special token when missing. The model
    (`from_pretrained_parts`) and the processor both call this on the same tokenizer, so they agree on the id by
    construction, whatever the size of the LLM's embedding matrix."""
    if tokenizer.convert_tokens_to_ids(PROTEIN_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(PROTEIN_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(PROTEIN_TOKEN)


# Mixture-of-experts fields live on the text config, where TRL and `load_balancing_loss_func` read them.
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "norm_topk_prob",
    "output_router_logits",
    "expert_capacity_factor",
    "expert_eval_capacity_factor",
    "expert_min_capacity",
)
MOE_DEFAULTS = {
    "num_experts": None,
    "num_experts_per_tok": 1,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": True,
    "output_router_logits": False,
    "expert_capacity_factor": None,
    "expert_eval_capacity_factor": None,
    "expert_min_capacity": 4,
}


@strict
class SepitConfig(PreTrainedConfig):
    r"""
    Configuration of [`SepitForConditionalGeneration`].

    Args:
        protein_config (`EsmConfig` or `dict`): the ESM-2 encoder.
        text_config (`PreTrainedConfig` or `dict`): any causal LM (Llama, Qwen2, Mistral, ...), resolved with
            `AutoConfig`.
        protein_token_id (`int`): id of the `<protein>` placeholder in the LLM vocabulary; the processor expands one
            per protein feature position (per group of `protein_pooling` positions).
        protein_feature_layer (`int`): which ESM hidden state is projected (-2: one layer below the top).
        protein_pooling (`int`): k, the feature positions averaged into one LLM token (beyond the paper, which uses 1):
            each protein's positions are taken k at a time (the last group may be shorter), so n positions cost
            ceil(n / k) LLM positions instead of n. The processor must expand `<protein>` with the same k.
        projector_hidden_act (`str`): activation between the two projector layers.
        num_gaussian_kernels (`int`): Gaussian basis functions over pairwise C-alpha distances.
        structure_embedding_scale (`float`): scale of the structural term added to the residue embeddings.
        structure_chunk_size (`int`): kernel values (residue pairs x kernels) expanded at once; the structure module's
            temporaries stay within this budget whatever the length and `num_gaussian_kernels`.
        sequence_only (`bool`): the paper's sequence-only ablation: plain ESM-2 with no structure module (coordinates
            given to it are ignored, with a warning).
        original_compat (`bool`): reproduce the original release (converted checkpoints): every padded protein position
            is spliced and attended, the structure bias covers the `[1:-1]` block of the padded length with
            coordinate-less queries included, and embeddings of pad-id tokens are zeroed.
        num_experts, num_experts_per_tok, router_aux_loss_coef, norm_topk_prob, output_router_logits: mixture of
            experts in every LLM feed-forward (`num_experts=None`: dense). Written to `text_config`, which the model
            and TRL read; the top-level copies mirror it.
        expert_capacity_factor, expert_eval_capacity_factor, expert_min_capacity: DeepSpeed's expert capacity in
            training and in evaluation (None: no dropping, the default; the original trained at 1.25 and evaluated
            at 2.0): an expert takes at most max(min_capacity, ceil(top_k * tokens / num_experts * factor))
            assignments of a batch, first choices first, then in token order; the rest are dropped.
    """

    model_type = "sepit"
    sub_configs_defaults = {
        "protein_config": SubConfigSpec(config_class=AutoConfig, model_type="esm"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    protein_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    protein_token_id: int = 32000
    protein_feature_layer: int = -2
    protein_pooling: int = 1
    projector_hidden_act: str = "gelu"
    num_gaussian_kernels: int = 128
    structure_embedding_scale: float = 0.01
    structure_chunk_size: int = 4_194_304
    original_compat: bool = False
    sequence_only: bool = False
    tie_word_embeddings: bool = False
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float | None = None
    norm_topk_prob: bool | None = None
    output_router_logits: bool | None = None
    expert_capacity_factor: float | None = None
    expert_eval_capacity_factor: float | None = None
    expert_min_capacity: int | None = None

    def __post_init__(self, **kwargs):
        # Checked before AutoConfig resolves them, whose error would list every model type but not name the field.
        for name, spec in self.sub_configs_defaults.items():
            sub = getattr(self, name)
            model_type = sub.get("model_type", spec.model_type) if isinstance(sub, dict) else None
            if model_type is not None and model_type not in CONFIG_MAPPING:
                valid = "'esm' (an ESM-2 config)" if name == "protein_config" else "a causal LM's, e.g. 'llama'"
                raise ValueError(f"{name}.model_type={model_type!r} is not a transformers model type; use {valid}")
            if isinstance(sub, dict):
                # Resolved here rather than by the base class, so that a wrong type inside names its sub-config.
                try:
                    resolved, _ = spec.create_subconfig(name, sub)
                except StrictDataclassError as error:
                    raise ValueError(
                        config_error_message(error, sub, CONFIG_MAPPING[model_type], f"{name}.")
                    ) from error
                setattr(self, name, resolved)
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        dense = (
            self.num_experts if self.num_experts is not None else getattr(self.text_config, "num_experts", None)
        ) is None
        for name in MOE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self.text_config, name, value)
            elif getattr(self.text_config, name, None) is None:
                if dense and name == "output_router_logits":
                    # A dense LLM has no router logits to output: without the flag, transformers and TRL see a dense
                    # model (TRL refuses a router_aux_loss_coef for it); upcycling sets it.
                    continue
                # A dense LLM has no router: a zero coefficient tells TRL there is no load-balancing loss to add.
                default = 0.0 if name == "router_aux_loss_coef" and dense else MOE_DEFAULTS[name]
                setattr(self.text_config, name, default)
            # Mirrored for reading; the model and TRL read the text config.
            setattr(self, name, getattr(self.text_config, name, None))
        self.validate_sepit()

    def validate_sepit(self) -> None:
        """Fail at construction, naming the field, rather than with a shape error deep in the model."""
        if self.protein_config.model_type != "esm":
            raise ValueError(
                f"protein_config.model_type must be 'esm' (an ESM-2 config), got {self.protein_config.model_type!r}"
            )
        layers = self.protein_config.num_hidden_layers
        if not -(layers + 1) <= self.protein_feature_layer <= layers:
            raise ValueError(f"protein_feature_layer={self.protein_feature_layer} is outside [-{layers + 1}, {layers}]")
        if self.protein_pooling < 1:
            raise ValueError(f"protein_pooling must be >= 1 (1: a token per position), got {self.protein_pooling}")
        if self.sequence_only and self.original_compat:
            raise ValueError("sequence_only=True needs original_compat=False: the release has a structure module")
        if self.protein_token_id < 0:
            raise ValueError(f"protein_token_id must be a token id >= 0, got {self.protein_token_id}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            special = getattr(self.text_config, name, None)
            if self.protein_token_id in (special if isinstance(special, list | tuple) else [special]):
                raise ValueError(
                    f"protein_token_id={self.protein_token_id} is the LLM's text_config.{name}: `<protein>` needs an "
                    "id of its own (SepitProcessor.from_pretrained_parts adds one: use processor.protein_token_id)"
                )
        if not math.isfinite(self.structure_embedding_scale):
            raise ValueError(f"structure_embedding_scale must be a finite number, got {self.structure_embedding_scale}")
        if self.original_compat and self.protein_pooling != 1:
            raise ValueError(
                f"protein_pooling={self.protein_pooling} needs original_compat=False: the original release splices one "
                "token per padded position"
            )
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(f"projector_hidden_act={self.projector_hidden_act!r} is unknown; use e.g. 'gelu', 'relu'")
        if self.num_gaussian_kernels < 1:
            raise ValueError(f"num_gaussian_kernels must be >= 1, got {self.num_gaussian_kernels}")
        if self.structure_chunk_size < 1:
            raise ValueError(f"structure_chunk_size must be >= 1, got {self.structure_chunk_size}")
        experts = self.text_config.num_experts
        if experts is not None:
            if experts < 1:
                raise ValueError(f"num_experts must be >= 1 or None (dense), got {experts}")
            per_token = self.text_config.num_experts_per_tok
            if not 1 <= per_token <= experts:
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts={experts}], got {per_token}")
        coefficient = self.text_config.router_aux_loss_coef
        if not (math.isfinite(coefficient) and coefficient >= 0):
            raise ValueError(
                f"router_aux_loss_coef must be a finite number >= 0 (0: no load balancing), got {coefficient}"
            )
        for name in ("expert_capacity_factor", "expert_eval_capacity_factor"):
            factor = getattr(self.text_config, name, None)
            if factor is not None and not factor > 0:
                raise ValueError(f"{name} must be > 0 (DeepSpeed's capacity factor) or None (no dropping): {factor}")


def _readable_type(annotation: object) -> str:
    """A field's annotation as a user reads it: `int | None` -> 'int or None'."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_readable_type(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def config_error_message(error: StrictDataclassError, values: dict, config_class: type, prefix: str = "") -> str:
    """A strict-dataclass error (not a ValueError, and naming neither the sub-config nor what is valid) as a message
    naming the field, its value and the type it must have."""
    cause = error.__cause__ or error
    found = (
        re.search(r"field '([^']+)'", str(error)) if isinstance(error, StrictDataclassFieldValidationError) else None
    )
    if found is None:
        return f"{prefix.rstrip('.') or config_class.__name__}: {cause}"
    name = found.group(1)
    field = {field.name: field for field in dataclasses.fields(config_class)}.get(name)
    valid = f"it must be {_readable_type(field.type)}" if field is not None else str(cause)
    if name not in values:
        return f"{prefix}{name}: wrong type; {valid}"
    value = values[name]
    return f"{prefix}{name}={value!r} has type {type(value).__name__}; {valid}"


def _named_type_errors(init: typing.Callable) -> typing.Callable:
    """Wrap `SepitConfig.__init__`: a value of the wrong type is a ValueError naming the field (a hand-edited
    config.json with `"num_gaussian_kernels": "128"`), which the CLIs report in one line."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(config_error_message(error, kwargs, type(self))) from error

    return __init__


SepitConfig.__init__ = _named_type_errors(SepitConfig.__init__)

__all__ = ["PROTEIN_TOKEN", "SepitConfig", "add_protein_token"]
