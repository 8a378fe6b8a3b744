"""SEPIT configuration: an ESM-2 protein encoder, its structure module, a projector and a causal LM."""

from huggingface_hub.dataclasses import strict
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
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef", "norm_topk_prob", "output_router_logits")
MOE_DEFAULTS = {
    "num_experts": None,
    "num_experts_per_tok": 1,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": True,
    "output_router_logits": False,
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
        original_compat (`bool`): reproduce the original release (converted checkpoints): every padded protein position
            is spliced and attended, the structure bias covers the `[1:-1]` block of the padded length with
            coordinate-less queries included, and embeddings of pad-id tokens are zeroed.
        num_experts, num_experts_per_tok, router_aux_loss_coef, norm_topk_prob, output_router_logits: mixture of
            experts in every LLM feed-forward (`num_experts=None`: dense). Written to `text_config`, which the model
            and TRL read; the top-level copies mirror it.
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
    tie_word_embeddings: bool = False
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float | None = None
    norm_topk_prob: bool | None = None
    output_router_logits: bool | None = None

    def __post_init__(self, **kwargs):
        # Checked before AutoConfig resolves them, whose error would list every model type but not name the field.
        for name, spec in self.sub_configs_defaults.items():
            sub = getattr(self, name)
            model_type = sub.get("model_type", spec.model_type) if isinstance(sub, dict) else None
            if model_type is not None and model_type not in CONFIG_MAPPING:
                valid = "'esm' (an ESM-2 config)" if name == "protein_config" else "a causal LM's, e.g. 'llama'"
                raise ValueError(f"{name}.model_type={model_type!r} is not a transformers model type; use {valid}")
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
                # A dense LLM has no router: a zero coefficient tells TRL there is no load-balancing loss to add.
                default = 0.0 if name == "router_aux_loss_coef" and dense else MOE_DEFAULTS[name]
                setattr(self.text_config, name, default)
            # Mirrored for reading; the model and TRL read the text config.
            setattr(self, name, getattr(self.text_config, name))
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


__all__ = ["PROTEIN_TOKEN", "SepitConfig", "add_protein_token"]
