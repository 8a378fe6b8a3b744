"""SEPIT: a structure-aware ESM-2 encoder whose per-residue features are spliced into a causal LM."""

import copy
import inspect
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel, EsmModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.configuration_utils import PreTrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.import_utils import is_tracing

from .configuration_sepit import SepitConfig, add_protein_token
from .modeling_moe import (
    SepitSparseMoeBlock,
    SepitTopKRouter,
    build_moe_layers,
    check_gated_mlp,
    decoder_layers,
    load_balancing_loss,
    plan_experts,
)
from .modeling_structure import SepitGaussianKernels, SepitStructureModule

logger = logging.get_logger(__name__)

# Protein inputs of a prompt; decoding steps read the proteins from the KV cache instead.
PROTEIN_INPUT_NAMES = (
    "protein_input_ids",
    "protein_attention_mask",
    "protein_coords",
    "protein_coords_mask",
    "mm_encoder_outputs",
)
# Attention implementations that take the structure bias (an additive float mask) in the ESM layers.
BIAS_ATTENTION = ("eager", "sdpa")
# CPU inference: once a padded batch's activations outgrow the cache, the encoder's elementwise passes (ESM-2's GELU,
# the rotary products) turn memory-bound; length-sorted calls of at most this many padded positions, each cut to its
# longest protein, ran ESM-2 650M on 8 proteins of 138-512 residues 2.1x faster in bf16 than one padded call
# (benchmarks/README.md, "Generation at the TinyLlama geometry").
CPU_ENCODER_POSITIONS = 512
PIPELINE_FILE = "pipeline_protein_qa.py"
CUSTOM_PIPELINES = {
    "protein-qa": {
        "impl": "pipeline_protein_qa.ProteinQuestionAnsweringPipeline",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],
        "type": "multimodal",
    }
}
# Token ids: what `nn.Embedding` takes.
TOKEN_ID_DTYPES = (torch.int64, torch.int32)
TENSOR_KINDS = {
    "ids": "integers (torch.long, or torch.int32)",
    "mask": "0/1 values (bool, integer or float dtype)",
    "real": "real numbers (e.g. torch.float32)",
    "float": "floating-point numbers (e.g. torch.float32)",
}
# `generate` arguments that are token counts (`True` would silently mean 1), and its tensor inputs.
COUNT_ARGUMENTS = ("max_new_tokens", "min_new_tokens", "max_length", "min_length")
GENERATE_TENSOR_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", *PROTEIN_INPUT_NAMES[:-1])
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class SepitModelOutputWithPast(ModelOutput):
    """
    last_hidden_state: LLM hidden states, same length as `input_ids`.
    router_logits: per MoE layer, (tokens, num_experts) router logits, when `output_router_logits`.
    protein_features: projected protein features (protein tokens, LLM width) spliced into the sequence: one per feature
        position, or per group of `protein_pooling` positions (under torch.compile, followed by the padding positions'
        rows, which are not spliced).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    protein_features: torch.FloatTensor | None = None


@dataclass
class SepitCausalLMOutputWithPast(ModelOutput):
    """`loss` includes `router_aux_loss_coef * aux_loss` when router logits are requested."""

    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    protein_features: torch.FloatTensor | None = None


class SepitMultiModalProjector(nn.Module):
    """Two-layer MLP from the ESM width to the LLM width."""

    def __init__(self, config: SepitConfig):
        super().__init__()
        text_hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.protein_config.hidden_size, text_hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, protein_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(protein_features)))


@lru_cache
def find_pipeline_code(source: str) -> Path | None:
    """The `protein-qa` pipeline's code: next to this file (the package), else in the folder or Hub repository `source`
    the model was loaded from (with `trust_remote_code`, transformers' module cache holds only the modeling code and
    what it imports); None when neither has it. Cached: `save_pretrained` runs at every checkpoint."""
    here = Path(__file__).with_name(PIPELINE_FILE)
    if here.is_file():
        return here
    if Path(source, PIPELINE_FILE).is_file():
        return Path(source, PIPELINE_FILE)
    try:
        validate_repo_id(source)
        folder = snapshot_download(source, allow_patterns=["*.py"])
    except (HFValidationError, OSError, ValueError):  # not a repository id, offline and not cached, ...
        return None
    return Path(folder, PIPELINE_FILE) if Path(folder, PIPELINE_FILE).is_file() else None


class SepitPreTrainedModel(PreTrainedModel):
    config: SepitConfig
    base_model_prefix = "model"
    input_modalities = ("protein", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    # The LLM takes any implementation; ESM takes flash/flex attention only for proteins without coordinates (the
    # structure bias is an additive mask): `forward` refuses coordinates otherwise, naming the fix.
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Decoding steps compile without a graph break (the prompt pass too, except with protein_pooling > 1).
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SepitGaussianKernels):
            # The original's constructor draws means and widths uniform in [0, 3); its release (loaded with
            # from_pretrained) kept them at 0 (`convert_original_sepit.kernel_report`). New models learn them.
            init.uniform_(module.means, 0.0, 3.0)
            init.uniform_(module.stds, 0.0, 3.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' `from_pretrained`, but a local folder is checked first: a missing config.json (from which
        transformers would silently build a default config) or missing / unreadable weights raise a ValueError naming
        the file. A checkpoint lacking weights the model has is refused, naming them (transformers would leave them
        random and only log it), unless `output_loading_info=True` asks for the list; a local folder's weights stored
        as integers, booleans or complex numbers where the model has floating-point ones are refused too (they would
        be cast silently)."""
        folder = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        local = folder.is_dir() and kwargs.get("state_dict") is None and not kwargs.get("gguf_file")
        if local:
            check_checkpoint_folder(folder, needs_config=kwargs.get("config") is None)
        if pretrained_model_name_or_path is None or kwargs.get("state_dict") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        caller_wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"])
        if missing and not caller_wants_info:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{pretrained_model_name_or_path}: the checkpoint lacks {len(missing)} weights of the model ({shown}); "
                "they would be random. Save the model again (save_pretrained), or load with output_loading_info=True "
                "to get them initialised and listed"
            )
        if local:
            check_stored_dtypes(model, folder)
        return (model, info) if caller_wants_info else model

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs) -> None:
        """Weights are saved under the module names, not reverted to ESM's legacy `LayerNorm.gamma/beta` layout:
        Trainer's resume loads checkpoints with a plain `load_state_dict`, which would silently skip renamed keys.

        With the remote code, the `protein-qa` pipeline's code is written too (and `custom_pipelines` only then), so
        the standard pair `model.save_pretrained` + `processor.save_pretrained`, and `push_to_hub`, give a folder
        that builds its own pipeline with `trust_remote_code=True`."""
        pipeline_code = find_pipeline_code(str(getattr(self, "name_or_path", "") or ""))
        if getattr(type(self), "_auto_class", None) is not None:
            # Remote-code chat models answer to both auto classes; `register_for_auto_class` records only one.
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModelForCausalLM"] = f"modeling_sepit.{SepitForConditionalGeneration.__name__}"
            self.config.auto_map = auto_map
            if pipeline_code is not None:
                self.config.custom_pipelines = CUSTOM_PIPELINES
        if pipeline_code is None and getattr(self.config, "custom_pipelines", None):
            # Without the pipeline's code the folder cannot promise the pipeline.
            logger.warning(f"{PIPELINE_FILE} was not found: the folder gets no protein-qa code")
            del self.config.custom_pipelines
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)
        if getattr(self.config, "custom_pipelines", None) and pipeline_code is not None:
            for source in [pipeline_code, *get_relative_import_files(str(pipeline_code))]:
                destination = Path(save_directory, Path(source).name)
                if not destination.exists():
                    shutil.copy(source, destination)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        """As transformers', but layers that reentrant checkpointing would get wrong use `use_reentrant=False`: the
        ESM layers, which receive the structure bias as a keyword argument (its gradient is dropped and the backward
        pass fails), and the LLM layers of an MoE model, whose router logits are recorded by hooks (under reentrant
        checkpointing the forward runs without gradients, so the load-balancing loss would train nothing)."""
        if gradient_checkpointing_func is None:
            super()._set_gradient_checkpointing(enable, **kwargs)
            return
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)
        keywords = getattr(gradient_checkpointing_func, "keywords", {})
        if not (enable and keywords.get("use_reentrant", False) and hasattr(self, "get_protein_model")):
            return
        parts = [self.get_protein_model()]
        if self.config.text_config.num_experts is not None:
            parts.append(self.get_decoder())
        logger.warning_once(
            "gradient checkpointing with use_reentrant=True: the ESM layers (structure bias as a keyword argument) and "
            "an MoE LLM's layers (router logits recorded by hooks) use use_reentrant=False"
        )
        non_reentrant = partial(gradient_checkpointing_func.func, **{**keywords, "use_reentrant": False})
        for part in parts:
            for module in part.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module._gradient_checkpointing_func = non_reentrant


class SepitModel(SepitPreTrainedModel):
    """Encoder + structure module + projector + LLM backbone; splices protein features at `<protein>` tokens."""

    def __init__(self, config: SepitConfig):
        super().__init__(config)
        vocab_size = config.text_config.vocab_size
        if not config.protein_token_id < vocab_size:
            raise ValueError(
                f"protein_token_id={config.protein_token_id} is outside the LLM vocabulary (text_config.vocab_size="
                f"{vocab_size}): give the id the processor's tokenizer gives `<protein>` (from_pretrained_parts grows "
                "the embeddings to hold it)"
            )
        self.protein_model = EsmModel(config.protein_config, add_pooling_layer=False)
        keep_feature_layers(self.protein_model, config.protein_feature_layer)
        # The paper's sequence-only ablation (the original's `sequence_only=True`): plain ESM-2, no structure module.
        self.structure_module = None if config.sequence_only else SepitStructureModule(config)
        self.multi_modal_projector = SepitMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        init_routers_too(self.language_model)
        if config.text_config.num_experts is not None:
            build_moe_layers(self.language_model, config.text_config)
        # ESM-2 checkpoints hold the layers above the projected one, which SEPIT never computes.
        self._keys_to_ignore_on_load_unexpected = unused_protein_weights(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_protein_model(self) -> EsmModel:
        return self.protein_model

    def get_protein_features(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor | None = None,
        protein_coords: torch.Tensor | None = None,
        protein_coords_mask: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """Projected features, flattened to (protein tokens, LLM width) in protein order; with `return_dict=True` a
        `BaseModelOutputWithPooling` whose `pooler_output` holds one (tokens, LLM width) tensor per protein, the form
        `forward(mm_encoder_outputs={"protein": ...})` and `generate` take, so that a protein is encoded once for
        many questions.

        Feature positions are the tokens with `protein_attention_mask == 1` (`<cls>`, residues, `<eos>`), or every
        padded position under `original_compat`; with `protein_pooling=k` each protein's positions are averaged k at a
        time, so a protein with n positions gives ceil(n / k) tokens.
        """
        protein_attention_mask, coords_mask = validate_protein_inputs(
            protein_input_ids, protein_attention_mask, protein_coords, protein_coords_mask, self._protein_vocab_size()
        )
        self._check_structure_attention(coords_mask)
        features = self._encode_proteins(protein_input_ids, protein_attention_mask, protein_coords, coords_mask)
        if not return_dict:
            return features
        counts = self._protein_token_counts(protein_input_ids, protein_attention_mask)
        return BaseModelOutputWithPooling(pooler_output=features.split(counts.tolist()))

    def _protein_vocab_size(self) -> int:
        return self.protein_model.embeddings.word_embeddings.num_embeddings

    def _protein_token_counts(
        self, protein_input_ids: torch.Tensor, protein_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """LLM positions of each protein: its padded width under `original_compat`, else ceil(positions / k)."""
        if self.config.original_compat:
            return torch.full((protein_input_ids.shape[0],), protein_input_ids.shape[1], dtype=torch.long)
        return pooled_counts(protein_attention_mask.sum(-1), self.config.protein_pooling)

    def _check_structure_attention(self, coords_mask: torch.Tensor | None) -> None:
        implementation = self.protein_model.config._attn_implementation
        if coords_mask is not None and self.structure_module is not None and implementation not in BIAS_ATTENTION:
            raise ValueError(
                f"protein_coords: the structure bias is an additive attention mask, which the ESM encoder's "
                f"{implementation!r} attention cannot take; load with attn_implementation={{'protein_config': 'sdpa', "
                f"'text_config': {implementation!r}}} (flash/flex attention for the LLM), or give sequences only"
            )

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Where the `<protein>` placeholders are: from `input_ids`, or, given only `inputs_embeds`, the positions
        holding the placeholder's embedding (as LLaVA finds its image tokens)."""
        if input_ids is not None:
            return input_ids == self.config.protein_token_id
        token = torch.full((), self.config.protein_token_id, dtype=torch.long, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token)).all(-1)

    def _encoder_calls(self, protein_attention_mask: torch.Tensor) -> list[list[int]] | None:
        """Proteins (indices, length-sorted) for separate encoder calls of at most `CPU_ENCODER_POSITIONS` padded
        positions, or None for one call: at CPU inference only, where a large padded call is memory-bound; training,
        `original_compat` (padding is its recipe), compiled graphs, accelerators and distributed runs (a sharded
        encoder gathers its weights at every call, which every rank must make alike) keep the one padded call."""
        if (
            torch.is_grad_enabled()
            or (torch.distributed.is_available() and torch.distributed.is_initialized())
            or self.config.original_compat
            or is_tracing()
            or protein_attention_mask.device.type != "cpu"
            or protein_attention_mask.numel() <= CPU_ENCODER_POSITIONS
        ):
            return None
        lengths = protein_attention_mask.sum(-1).tolist()
        calls: list[list[int]] = [[]]
        for index in sorted(range(len(lengths)), key=lengths.__getitem__):  # the newest protein is the longest
            if calls[-1] and (len(calls[-1]) + 1) * lengths[index] > CPU_ENCODER_POSITIONS:
                calls.append([])
            calls[-1].append(index)
        return calls if len(calls) > 1 else None

    def _encode_proteins(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor,
        protein_coords: torch.Tensor | None,
        coords_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`get_protein_features` on inputs `validate_protein_inputs` has checked."""
        calls = self._encoder_calls(protein_attention_mask)
        if calls is None:
            return self._encode_in_one_call(protein_input_ids, protein_attention_mask, protein_coords, coords_mask)
        counts = self._protein_token_counts(protein_input_ids, protein_attention_mask).tolist()
        pieces: list[torch.Tensor | None] = [None] * len(counts)
        tensors = (protein_input_ids, protein_attention_mask, protein_coords, coords_mask)
        for call in calls:
            rows = torch.tensor(call, device=protein_input_ids.device)
            columns = protein_attention_mask[rows].bool().any(0)  # the call's own width, either padding side
            features = self._encode_in_one_call(*(None if t is None else t[rows][:, columns] for t in tensors))
            for index, piece in zip(call, features.split([counts[i] for i in call]), strict=True):
                pieces[index] = piece
        return torch.cat(pieces)

    def _encode_in_one_call(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor,
        protein_coords: torch.Tensor | None,
        coords_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The encoder, structure module and projector on one padded batch of proteins."""
        embeddings = self.protein_model.embeddings(input_ids=protein_input_ids, attention_mask=protein_attention_mask)
        encoder_mask = protein_attention_mask
        if coords_mask is not None and self.structure_module is None:
            logger.warning_once("a sequence-only SEPIT model (no structure module) ignores protein coordinates")
        elif coords_mask is not None:
            attention_bias, embedding_term = self.structure_module(protein_coords, coords_mask)
            if embedding_term is not None:
                embeddings = embeddings + embedding_term.to(embeddings.dtype)
            if attention_bias is not None:
                # An additive float mask carries the bias through the attention interface (eager and SDPA).
                padding = protein_attention_mask[:, None, None, :] == 0
                encoder_mask = attention_bias.to(embeddings.dtype).masked_fill(
                    padding, torch.finfo(embeddings.dtype).min
                )
        if self.protein_model.encoder.emb_layer_norm_after is None:
            # The layers above the projected one were dropped (`keep_feature_layers`): its state is the last one.
            selected = self.protein_model(inputs_embeds=embeddings, attention_mask=encoder_mask).last_hidden_state
        else:
            # The top layer is projected: only its hidden state is kept (transformers' hidden-state selection).
            layer = self.config.protein_feature_layer
            encoder_outputs = self.protein_model(
                inputs_embeds=embeddings, attention_mask=encoder_mask, output_hidden_states=[layer], return_dict=True
            )
            selected = encoder_outputs.hidden_states[layer]
        if self.config.protein_pooling > 1:
            # Pooled at the ESM width, before the projector: cheaper than pooling projected LLM-width features.
            selected = pool_protein_states(selected, protein_attention_mask, self.config.protein_pooling)
        elif not self.config.original_compat:
            if is_tracing():
                # Static shapes for torch.compile: every position, the attended ones first and in order (a boolean
                # index's shape depends on the data); `masked_scatter` takes as many rows as there are placeholders.
                padding = (protein_attention_mask == 0).flatten().to(torch.int8)
                selected = selected.reshape(-1, selected.shape[-1])[torch.argsort(padding, stable=True)]
            else:
                selected = selected[protein_attention_mask.bool()]
        return self.multi_modal_projector(selected.reshape(-1, selected.shape[-1]))

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        protein_input_ids: torch.LongTensor | None = None,
        protein_attention_mask: torch.Tensor | None = None,
        protein_coords: torch.FloatTensor | None = None,
        protein_coords_mask: torch.BoolTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> SepitModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        self._check_text_inputs(input_ids, attention_mask, position_ids, inputs_embeds, cache)
        if mm_encoder_outputs is not None and (
            not isinstance(mm_encoder_outputs, dict) or set(mm_encoder_outputs) - {"protein"}
        ):
            shown = sorted(mm_encoder_outputs) if isinstance(mm_encoder_outputs, dict) else ""
            raise ValueError(
                f"mm_encoder_outputs: got {type(mm_encoder_outputs).__name__} {shown}; give a dict {{'protein': "
                "get_protein_features(..., return_dict=True)}"
            )
        precomputed = (mm_encoder_outputs or {}).get("protein")
        if precomputed is not None and protein_input_ids is not None:
            raise ValueError("Pass the proteins either as `protein_input_ids` or as `mm_encoder_outputs`, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if self.config.original_compat:
                # The release zeroes the embeddings of pad-id tokens (pad is eos there).
                is_pad = input_ids == self.config.text_config.pad_token_id
                inputs_embeds = inputs_embeds.masked_fill(is_pad.unsqueeze(-1), 0.0)

        protein_features = None
        placeholder = self.get_placeholder_mask(input_ids, inputs_embeds)
        if protein_input_ids is not None:
            protein_attention_mask, coords_mask = validate_protein_inputs(
                protein_input_ids,
                protein_attention_mask,
                protein_coords,
                protein_coords_mask,
                self._protein_vocab_size(),
            )
            self._check_structure_attention(coords_mask)
            # Checked before the encoder runs: a mismatch fails at once, naming the fields.
            tokens = self._protein_token_counts(protein_input_ids, protein_attention_mask)
            source = f"the {protein_input_ids.shape[0]} proteins"
            self._check_placeholder_count(placeholder, tokens, source)
            protein_features = self._encode_proteins(
                protein_input_ids, protein_attention_mask, protein_coords, coords_mask
            )
        elif precomputed is not None:
            pieces = self._precomputed_pieces(precomputed)
            protein_features = torch.cat(pieces)
            # One tensor for several proteins has no boundaries to check the runs against: only their total.
            listed = isinstance(precomputed.pooler_output, list | tuple)
            tokens = torch.tensor([len(piece) for piece in pieces]) if listed else len(protein_features)
            self._check_placeholder_count(placeholder, tokens, "mm_encoder_outputs['protein']")
        elif input_ids is not None and not is_tracing() and not (cache is not None and cache.get_seq_length() > 0):
            # Prompts only: decoding steps read the proteins from the cache, and `generate` never emits `<protein>`
            # unless told to (the original release embedded a generated `<protein>` as text). `inputs_embeds` without
            # proteins are used as given, as LLaVA does: the caller may have placed the protein features already.
            if bool(placeholder.any()):
                raise ValueError(
                    "`input_ids` contain `<protein>` tokens but no `protein_input_ids` were given: pass the proteins "
                    "(SepitProcessor returns them) or remove the `<protein>` tags."
                )
        if protein_features is not None:
            inputs_embeds = inputs_embeds.masked_scatter(
                placeholder.unsqueeze(-1), protein_features.to(inputs_embeds.device, inputs_embeds.dtype)
            )

        if output_router_logits is None:  # as Mixtral: the config's flag, for an MoE LLM
            text_config = self.config.text_config
            output_router_logits = text_config.num_experts is not None and bool(text_config.output_router_logits)
        router_logits: list[torch.Tensor] = []
        # The routers sit inside the LLM backbone, whose own output capturing does not know them: record them here.
        routers = self.language_model.modules() if output_router_logits else ()  # no module walk per decoding step
        hooks = [
            router.register_forward_hook(lambda _module, _args, output: router_logits.append(output[0]))
            for router in routers
            if isinstance(router, SepitTopKRouter)
        ]
        try:
            outputs = self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()
        return SepitModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(router_logits) if output_router_logits else None,
            protein_features=protein_features,
        )

    def _check_text_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        cache: Cache | None,
    ) -> None:
        """The LLM inputs' types and ranks (metadata, every call); their shapes against each other and the cache, and
        on a prompt pass their values (one host sync; none in decoding steps, whose ids `generate` made). Shapes and
        values are not checked while torch.compile traces: the cache length would specialise the graph."""
        if input_ids is not None:
            check_tensor("input_ids", input_ids, "ids", (2,), "(batch, sequence)")
        if inputs_embeds is not None:
            check_tensor("inputs_embeds", inputs_embeds, "float", (3,), "(batch, sequence, hidden size)")
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, "mask", (2, 4), "(batch, past + sequence), or 4-D")
        if position_ids is not None:
            check_tensor("position_ids", position_ids, "ids", (2, 3), "(batch or 1, sequence)")
        if is_tracing():
            return
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        hidden = self.config.text_config.hidden_size
        if inputs_embeds is not None and inputs_embeds.shape[-1] != hidden:
            raise ValueError(
                f"inputs_embeds has width {inputs_embeds.shape[-1]}; it must be the LLM's hidden size {hidden}"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape != (batch, past + length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must be (batch, cached + new tokens) = "
                f"({batch}, {past} + {length}), one column per token"
            )
        if attention_mask is not None and attention_mask.ndim == 4:
            # A prepared mask goes to the attention as it is (transformers' masking utilities do not touch it); its
            # key length may be a static cache's size.
            heads = self.config.text_config.num_attention_heads
            shape = tuple(attention_mask.shape)
            if shape[0] != batch or shape[1] not in (1, heads) or shape[2] != length or shape[3] < past + length:
                raise ValueError(
                    f"attention_mask is 4-D with shape {shape}; a prepared mask must be (batch, 1, new tokens, at "
                    f"least cached + new tokens) = ({batch}, 1, {length}, >= {past + length}), or 2-D (batch, "
                    f"{past + length})"
                )
            if not (attention_mask.dtype is torch.bool or attention_mask.dtype.is_floating_point):
                raise ValueError(
                    f"attention_mask is 4-D with dtype {attention_mask.dtype}; a prepared mask is bool (True: attend) "
                    "or float (0 to attend, a large negative number not to)"
                )
        if position_ids is not None and (position_ids.shape[-1] != length or position_ids.shape[-2] not in (1, batch)):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}; it must be (batch or 1, sequence) = "
                f"({batch}, {length})"
            )
        if past:
            return
        problems = []
        if input_ids is not None:
            vocab_size = self.config.text_config.vocab_size
            problems.append(
                (
                    (input_ids < 0) | (input_ids >= vocab_size),
                    lambda at: (
                        f"input_ids holds {int(input_ids[at])} at row {at[0]}, position "
                        f"{at[1]}: token ids must be in [0, {vocab_size}) (text_config.vocab_size); tokenize "
                        "with the model's processor"
                    ),
                )
            )
        if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.dtype is not torch.bool:
            problems.append(
                (
                    (attention_mask != 0) & (attention_mask != 1),
                    lambda at: (
                        f"attention_mask holds {attention_mask[at].item()} at row {at[0]}, "
                        f"position {at[1]}: it must hold only 0 (padding) and 1 (a token)"
                    ),
                )
            )
        _raise_first(problems)

    def _precomputed_pieces(self, precomputed: object) -> list[torch.Tensor]:
        """`mm_encoder_outputs['protein'].pooler_output` as a list of (tokens, LLM width) tensors, checked."""
        name = "mm_encoder_outputs['protein'].pooler_output"
        pieces = getattr(precomputed, "pooler_output", None)
        if pieces is None:
            raise ValueError(f"{name} is missing; give get_protein_features(..., return_dict=True)")
        pieces = list(pieces) if isinstance(pieces, list | tuple) else [pieces]
        hidden = self.config.text_config.hidden_size
        for piece in pieces:
            check_tensor(name, piece, "float", (2,), f"(protein tokens, {hidden}) per protein")
            if piece.shape[-1] != hidden:
                raise ValueError(f"{name} has width {piece.shape[-1]}; it must be the LLM's hidden size {hidden}")
        return pieces

    def _check_placeholder_count(self, placeholder: torch.Tensor, tokens: torch.Tensor | int, source: str) -> None:
        """The `<protein>` placeholders must number the protein tokens and, given per-protein counts (`tokens` a
        tensor), hold each protein's as one run, in protein order, row by row (`masked_scatter` fills them in that
        order: a run in the wrong row would get another protein's features). Placeholders under attention_mask 0 are
        allowed, as LLaVA allows its image tokens there (transformers' tests pad over them). One host sync. Not
        checked while torch.compile traces (the check would break the graph on a host sync): compile a model whose
        inputs passed it once in eager mode."""
        if is_tracing():
            return
        counts = torch.as_tensor(tokens, device=placeholder.device).reshape(-1)
        following = torch.zeros_like(placeholder)
        following[:, :-1] = placeholder[:, 1:]
        run_ends = placeholder & ~following  # a run ends before a non-placeholder or at the end of its row
        placed = placeholder.flatten().cumsum(0).view_as(placeholder)  # placeholders up to here, row by row
        misplaced = run_ends[:0, 0]
        if isinstance(tokens, torch.Tensor):
            misplaced = ~torch.isin(placed[run_ends], counts.cumsum(0))
        found, expected, misplaced_any = torch.stack([placeholder.sum(), counts.sum(), misplaced.any()]).tolist()
        pooling = self.config.protein_pooling
        if found != expected:
            raise ValueError(
                f"`input_ids` hold {found} `<protein>` tokens but {source} give {expected} protein tokens at "
                f"protein_pooling={pooling} (ceil(n / {pooling}) for a protein of n feature positions): build inputs "
                "with a SepitProcessor of the same protein_pooling, which expands each `<protein>` to its protein's "
                "tokens."
            )
        if misplaced_any:
            row, position = (int(i) for i in run_ends.nonzero()[misplaced.nonzero()[0]].flatten())
            shown = counts[:8].tolist()
            raise ValueError(
                f"`input_ids` row {row}: the `<protein>` run ending at position {position} does not end where a "
                f"protein's tokens end ({source} give {shown}{' ...' if len(counts) > 8 else ''} tokens, placed in "
                "order, row by row): each protein's placeholders must be one run in the row of its question; build "
                "inputs with SepitProcessor"
            )


def init_routers_too(language_model: PreTrainedModel) -> None:
    """Let the LLM backbone's own `_init_weights` (which transformers applies to every module inside it, e.g. to
    weights a checkpoint lacks) initialise the MoE routers too, as its linear layers."""
    llm_init_weights = language_model._init_weights
    std = getattr(language_model.config, "initializer_range", 0.02)

    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, SepitTopKRouter):
            init.normal_(module.weight, std=std)
        else:
            llm_init_weights(module)

    language_model._init_weights = _init_weights


def keep_feature_layers(protein_model: EsmModel, feature_layer: int) -> None:
    """Drop the ESM layers above the projected hidden state, with the final layer norm and the contact head: they
    would be computed on every forward and never used (and DDP would need `find_unused_parameters`). The projected
    layer's state is then the encoder's last (un-normalised) state. With the top layer projected, nothing is dropped."""
    layers = protein_model.encoder.layer
    index = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if index < len(layers):
        protein_model.encoder.layer = layers[:index]
        protein_model.encoder.emb_layer_norm_after = None
        protein_model.contact_head = None


def unused_protein_weights(config: SepitConfig) -> set[str]:
    """Patterns of the ESM-2 checkpoint weights `keep_feature_layers` leaves without a module."""
    layers = config.protein_config.num_hidden_layers
    feature_layer = config.protein_feature_layer
    index = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer
    if index >= layers:
        return set()
    dropped = "|".join(str(i) for i in range(index, layers))
    return {
        rf"protein_model\.encoder\.layer\.({dropped})\.",
        r"protein_model\.encoder\.emb_layer_norm_after\.",
        r"protein_model\.contact_head\.",
    }


def check_checkpoint_folder(folder: Path, needs_config: bool = True) -> None:
    """A ValueError naming what a local checkpoint folder lacks: config.json, or weights that safetensors can read."""
    if needs_config and not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; a model folder written by save_pretrained holds config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(folder.glob("model*.safetensors")):
        raise ValueError(
            f"{folder}: no model weights (model.safetensors); point to a folder written by save_pretrained"
        )
    weights = folder / "model.safetensors"
    if weights.is_file():
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{weights}: not a readable safetensors file ({error}); save the model again") from error
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file() and not weights.is_file():
        try:
            # Memory-mapped (zip format, torch >= 1.6): only the pickle is read here, not the tensors transformers
            # reads again right after. The legacy non-zip format cannot be mapped: it is read whole.
            torch.load(legacy, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(legacy))
        except Exception as error:  # weights-only unpickling refuses anything but tensors, and runs none of it
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(error).strip().splitlines()[0])  # torch's message has ANSI bold
            raise ValueError(
                f"{legacy}: not a plain tensor checkpoint ({reason}); its pickled objects are never run: save the "
                "weights as safetensors (model.save_pretrained)"
            ) from error


def pooled_counts(feature_positions: torch.Tensor, pooling: int) -> torch.Tensor:
    """Protein tokens per protein, ceil(n / pooling): the processor and the model must agree on this count."""
    return torch.div(feature_positions + pooling - 1, pooling, rounding_mode="floor")


def pool_protein_states(states: torch.Tensor, attention_mask: torch.Tensor, pooling: int) -> torch.Tensor:
    """Mean of each protein's attended states, `pooling` consecutive ones at a time (the last group may be shorter,
    no group crosses proteins): (proteins, P, width) -> (sum of ceil(n / pooling), width), in protein order.

    The attended states are first packed to the left of a padded (proteins, groups * pooling) grid, so any mask
    layout works, and then summed group-wise by a reshape: deterministic, unlike atomic scatter-adds on GPU.
    """
    num_proteins, length, width = states.shape
    mask = attention_mask.bool()
    rank = mask.cumsum(-1) - 1  # each attended position's place among its protein's attended positions
    groups = -(-length // pooling)
    packed = states.new_zeros(num_proteins, groups * pooling, width)
    packed = packed.index_put((mask.nonzero(as_tuple=True)[0], rank[mask]), states[mask])
    sums = packed.view(num_proteins, groups, pooling, width).sum(2)
    starts = torch.arange(groups, device=states.device) * pooling
    sizes = (mask.sum(-1, keepdim=True) - starts).clamp(0, pooling)  # (proteins, groups): 0 past the last group
    present = sizes > 0
    return sums[present] / sizes[present].unsqueeze(-1).to(sums.dtype)


def check_labels(labels: object, reference: object, vocab_size: int) -> None:
    """`labels`: long token ids shaped as `input_ids`, each in [0, vocab_size) or -100 (no loss there); values in one
    host sync (a training step's loss syncs anyway), not while torch.compile traces. A malformed `reference` (the
    text input) is left to the model's own check, which names it."""
    if isinstance(labels, torch.Tensor) and labels.dtype is not torch.long:
        raise ValueError(f"labels has dtype {labels.dtype}; it must hold token ids of dtype torch.long (the loss's)")
    check_tensor("labels", labels, "ids", (2,), "(batch, sequence), as input_ids")
    if isinstance(reference, torch.Tensor) and reference.ndim >= 2 and labels.shape != reference.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; it must be input_ids' shape {tuple(reference.shape[:2])} (the "
            "model shifts them itself)"
        )
    if not is_tracing():
        outside = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        _raise_first(
            [
                (
                    outside,
                    lambda at: (
                        f"labels holds {int(labels[at])} at row {at[0]}, position "
                        f"{at[1]}: labels must be token ids in [0, {vocab_size}) or -100 where no loss is taken"
                    ),
                )
            ]
        )


def check_stored_dtypes(model: nn.Module, folder: Path) -> None:
    """A ValueError naming the weights that a local folder stores as integers, booleans or complex numbers where the
    model has floating-point tensors: loading would cast them silently (an int32 projector weight loads as whole
    numbers). Only the files' headers are read; quantized checkpoints (`quantization_config`) store integers."""
    if getattr(model.config, "quantization_config", None) is not None:
        return
    expected = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}."
    wrong = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():
                stored = weights.get_slice(key).get_dtype()
                if stored.startswith(("F", "BF")):
                    continue
                names = (key, prefix + key, key.removeprefix(prefix))
                if any(name in expected and expected[name].is_floating_point for name in names):
                    wrong.append(f"{key} ({stored})")
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise ValueError(
            f"{folder}: weights stored as non-floating-point numbers ({shown}) where the model has floating-point "
            "ones; they would be cast silently: save them as floats (model.save_pretrained)"
        )


def check_tensor(name: str, value: object, kind: str, ranks: tuple[int, ...], layout: str) -> None:
    """Type, dtype and rank of one tensor input: metadata only (no host sync, so also cheap in decoding steps)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name}: got {type(value).__name__}, not a torch tensor; pass torch tensors (SepitProcessor with "
            "return_tensors='pt', or torch.as_tensor)"
        )
    dtype = value.dtype
    valid = {
        "ids": dtype in TOKEN_ID_DTYPES,
        "mask": not dtype.is_complex,
        "real": dtype is not torch.bool and not dtype.is_complex,
        "float": dtype.is_floating_point,
    }[kind]
    if not valid:
        raise ValueError(f"{name} has dtype {dtype}; it must hold {TENSOR_KINDS[kind]}")
    if value.ndim not in ranks:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; it must be {layout}")


def _first(problem: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True of a problem mask (only on the error path: a host sync)."""
    return tuple(int(i) for i in problem.nonzero()[0])


def _raise_first(problems: list[tuple[torch.Tensor, Callable[[tuple[int, ...]], str]]]) -> None:
    """Several value checks in one host sync: raise the first failing check's message, given where it first fails."""
    if not problems:
        return
    device = problems[0][0].device
    verdicts = torch.stack([problem.any().to(device) for problem, _ in problems]).tolist()
    for verdict, (problem, message) in zip(verdicts, problems, strict=True):
        if verdict:
            raise ValueError(message(_first(problem)))


def validate_protein_inputs(
    protein_input_ids: torch.Tensor,
    protein_attention_mask: torch.Tensor | None,
    protein_coords: torch.Tensor | None,
    protein_coords_mask: torch.Tensor | None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the protein tensors' types, shapes and values (ids within `vocab_size`, masks of 0/1, an attended
    position per protein; values in one host sync, not while torch.compile traces); return the attention mask as
    long (all ones when not given) and the coordinate mask (None without coordinates)."""
    check_tensor("protein_input_ids", protein_input_ids, "ids", (2,), "(num_proteins, P)")
    shape = tuple(protein_input_ids.shape)
    if 0 in shape:
        raise ValueError(
            f"protein_input_ids has shape {shape}: no proteins or no positions; give (num_proteins, P) ESM tokens "
            "(<cls>, residues, <eos>), or leave the protein inputs out (None) for a prompt without proteins"
        )
    if protein_attention_mask is None:
        protein_attention_mask = torch.ones_like(protein_input_ids)
    check_tensor("protein_attention_mask", protein_attention_mask, "mask", (2,), "(num_proteins, P)")
    if tuple(protein_attention_mask.shape) != shape:
        raise ValueError(
            f"protein_attention_mask has shape {tuple(protein_attention_mask.shape)}; it must match "
            f"protein_input_ids {shape}"
        )
    if protein_coords is not None:
        check_tensor("protein_coords", protein_coords, "real", (3,), "(num_proteins, P, 3)")
        if tuple(protein_coords.shape) != (*shape, 3):
            raise ValueError(
                f"protein_coords must have shape (num_proteins, P, 3) = {(*shape, 3)} aligned with protein_input_ids, "
                f"got {tuple(protein_coords.shape)}"
            )
    if protein_coords_mask is not None:
        check_tensor("protein_coords_mask", protein_coords_mask, "mask", (2,), "(num_proteins, P)")
        if tuple(protein_coords_mask.shape) != shape:
            raise ValueError(
                f"protein_coords_mask must have shape (num_proteins, P) = {shape}, got "
                f"{tuple(protein_coords_mask.shape)}"
            )
    attended = protein_attention_mask != 0
    coords_mask = None
    if protein_coords is not None:
        finite = torch.isfinite(protein_coords).all(-1)
        coords_mask = (finite if protein_coords_mask is None else protein_coords_mask != 0) & attended
    if not is_tracing():
        ids, mask = protein_input_ids, protein_attention_mask
        problems = []
        if vocab_size is not None:
            problems.append(
                (
                    (ids < 0) | (ids >= vocab_size),
                    lambda at: (
                        f"protein_input_ids holds {int(ids[at])} at protein {at[0]}, "
                        f"position {at[1]}: ESM token ids must be in [0, {vocab_size}); tokenize with the "
                        "model's ESM tokenizer (SepitProcessor does)"
                    ),
                )
            )
        problems += [
            (
                (mask != 0) & (mask != 1),
                lambda at: (
                    f"protein_attention_mask holds {mask[at].item()} at protein {at[0]}, "
                    f"position {at[1]}: it must hold only 0 (padding) and 1 (a feature position)"
                ),
            ),
            (
                ~attended.any(-1),
                lambda at: (
                    f"protein_attention_mask is 0 everywhere for protein {at[0]}: each protein "
                    "needs its attended <cls>, residues and <eos>; leave an empty protein out (and its `<protein>` tag)"
                ),
            ),
        ]
        if protein_coords_mask is not None:
            present = protein_coords_mask
            problems.append(
                (
                    (present != 0) & (present != 1),
                    lambda at: (
                        f"protein_coords_mask holds {present[at].item()} at protein "
                        f"{at[0]}, position {at[1]}: it must be True/False (or 0/1)"
                    ),
                )
            )
            if protein_coords is None:
                problems.append(
                    (
                        present != 0,
                        lambda at: "protein_coords_mask marks residues with coordinates but protein_coords is missing",
                    )
                )
            else:
                problems.append(
                    (
                        coords_mask & ~finite,
                        lambda at: (
                            f"protein_coords has NaN/inf at protein {at[0]}, position "
                            f"{at[1]} where protein_coords_mask says the residue has coordinates: set the mask "
                            "to False there"
                        ),
                    )
                )
        _raise_first(problems)
    return protein_attention_mask.to(torch.long), coords_mask


class SepitForConditionalGeneration(SepitPreTrainedModel, GenerationMixin):
    """SEPIT with its LM head: answers questions about proteins given by sequence and optionally structure."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: SepitConfig):
        super().__init__(config)
        self.model = SepitModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_protein_model(self) -> EsmModel:
        return self.model.protein_model

    def get_protein_features(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor | None = None,
        protein_coords: torch.Tensor | None = None,
        protein_coords_mask: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """See [`SepitModel.get_protein_features`]."""
        return self.model.get_protein_features(
            protein_input_ids, protein_attention_mask, protein_coords, protein_coords_mask, return_dict=return_dict
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        protein_input_ids: torch.LongTensor | None = None,
        protein_attention_mask: torch.Tensor | None = None,
        protein_coords: torch.FloatTensor | None = None,
        protein_coords_mask: torch.BoolTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SepitCausalLMOutputWithPast:
        text_config = self.config.text_config
        if labels is not None:
            check_labels(labels, input_ids if input_ids is not None else inputs_embeds, text_config.vocab_size)
        moe = text_config.num_experts is not None
        if output_router_logits is None:
            output_router_logits = moe and text_config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            protein_input_ids=protein_input_ids,
            protein_attention_mask=protein_attention_mask,
            protein_coords=protein_coords,
            protein_coords_mask=protein_coords_mask,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            output_router_logits=output_router_logits and moe,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=text_config.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and moe:
            aux_loss = load_balancing_loss(
                outputs.router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + text_config.router_aux_loss_coef * aux_loss.to(loss.device)

        return SepitCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            protein_features=outputs.protein_features,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and cache is not None and cache.get_seq_length() > 0:
            # The encoder runs once per request: decoding steps read the proteins from the KV cache. (An assisting
            # model's first call is not a first iteration either, but its cache is still empty.)
            for name in PROTEIN_INPUT_NAMES:
                model_inputs.pop(name, None)
        return model_inputs

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """`GenerationMixin.generate`, never emitting `<protein>` unless `suppress_tokens` says otherwise: a generated
        placeholder has no protein to splice. An `assistant_model` must itself be a SEPIT model: a plain LLM cannot
        read the placeholders (LLaVA-style models refuse it the same way)."""
        for name, value in (("inputs", inputs), *((name, kwargs.get(name)) for name in GENERATE_TENSOR_INPUTS)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{name}: got {type(value).__name__}, not a torch tensor; pass the processor's output with "
                    "return_tensors='pt' (or torch.as_tensor)"
                )
        config = generation_config or self.generation_config
        for name in COUNT_ARGUMENTS:
            for value in (kwargs.get(name), getattr(config, name, None)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError(f"{name} must be an integer number of tokens, got {value!r}")
        assistant = kwargs.get("assistant_model")
        if assistant is not None and getattr(assistant.config, "model_type", None) != self.config.model_type:
            if any(kwargs.get(name) is not None for name in PROTEIN_INPUT_NAMES):
                raise ValueError(
                    f"assistant_model: a {type(assistant).__name__} cannot read SEPIT's `<protein>` placeholders; "
                    "assist with a smaller SEPIT model, or use prompt_lookup_num_tokens=... (no assistant model)"
                )
        # A caller's (or saved) `suppress_tokens`, even [], is theirs: the original release could emit `<protein>`,
        # and `suppress_tokens=[]` reproduces it. An assisting SEPIT model gets the target's processors, which do.
        processors = kwargs.get("logits_processor") or []
        if (
            kwargs.get("suppress_tokens") is None
            and (generation_config or self.generation_config).suppress_tokens is None
            and not any(isinstance(processor, SuppressTokensLogitsProcessor) for processor in processors)
        ):
            if generation_config is None:
                kwargs["suppress_tokens"] = [self.config.protein_token_id]
            else:
                generation_config = copy.deepcopy(generation_config)
                generation_config.suppress_tokens = [self.config.protein_token_id]
        return super().generate(inputs, generation_config, **kwargs)

    def upcycle_to_moe(
        self,
        num_experts: int = 4,
        num_experts_per_tok: int = 1,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.01,
        expert_capacity_factor: float | None = None,
        expert_eval_capacity_factor: float | None = None,
    ) -> "SepitForConditionalGeneration":
        """Turn every dense LLM FFN into `num_experts` copies of itself behind a new router (SEPIT stage 2).

        With `norm_topk_prob=True` the upcycled model computes what the dense one did, whatever the router says (and
        at top-1 the router still learns from the language-model loss: see `SepitTopKRouter`). Capacity factors:
        see `SepitConfig` (None: no token is dropped).
        """
        text_config = self.config.text_config
        if text_config.num_experts is not None:
            raise ValueError(f"the LLM already has {text_config.num_experts} experts per FFN")
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {num_experts_per_tok}"
            )
        layers = decoder_layers(self.model.language_model)
        for layer in layers:
            check_gated_mlp(layer.mlp)
        settings = {
            "num_experts": num_experts,
            "num_experts_per_tok": num_experts_per_tok,
            "norm_topk_prob": norm_topk_prob,
            "router_aux_loss_coef": router_aux_loss_coef,
            "expert_capacity_factor": expert_capacity_factor,
            "expert_eval_capacity_factor": expert_eval_capacity_factor,
            "output_router_logits": bool(getattr(text_config, "output_router_logits", False)),
        }
        for name in ("expert_capacity_factor", "expert_eval_capacity_factor"):
            if settings[name] is not None and not settings[name] > 0:
                raise ValueError(f"{name} must be > 0 (DeepSpeed's capacity factor) or None (no dropping)")
        for name, value in settings.items():
            setattr(text_config, name, value)
            setattr(self.config, name, value)
        reference = next(self.model.language_model.parameters())
        for layer in layers:
            layer.mlp = SepitSparseMoeBlock(text_config, layer.mlp).to(device=reference.device, dtype=reference.dtype)
        plan_experts(self.model.language_model)
        self.model.init_parallel_plans()  # the experts' tensor-parallel plan, up to the top
        self.init_parallel_plans()
        return self

    @classmethod
    def from_pretrained_parts(
        cls,
        protein_model_name_or_path: str,
        text_model_name_or_path: str,
        protein_token_id: int | None = None,
        **kwargs,
    ) -> "SepitForConditionalGeneration":
        """A SEPIT model from an ESM-2 checkpoint and a causal-LM checkpoint (names or paths, as for
        `from_pretrained`), with a fresh structure module and projector.

        Without `protein_token_id`, `<protein>` gets the id that the LLM's tokenizer gives it once the token is added
        (what `SepitProcessor.from_pretrained_parts` on the same LLM does), so model and processor agree by
        construction, also when the LLM's embedding matrix has more rows than its tokenizer has tokens (Qwen2); the
        embeddings grow to hold the id if needed. Keyword arguments go to `SepitConfig` when they name one of its
        fields (`protein_pooling`, ...), else to the `from_pretrained` calls (`dtype`, `revision`, `token`, ...).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # SEPIT's own fields: the generic ones (`dtype`, ...) are meant for loading.
        config_fields = SepitConfig.__dataclass_fields__.keys() - PreTrainedConfig.__dataclass_fields__
        config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in config_fields}
        protein_model = EsmModel.from_pretrained(protein_model_name_or_path, add_pooling_layer=False, **kwargs)
        keep_feature_layers(protein_model, config_kwargs.get("protein_feature_layer", -2))
        causal_lm = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **kwargs)
        text_config = causal_lm.config
        if protein_token_id is None:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder") if k in kwargs}
            try:
                tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **hub_kwargs)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"text_model_name_or_path: no tokenizer loads from {text_model_name_or_path} "
                    f"({str(error).strip().splitlines()[0]}), so the "
                    "`<protein>` id cannot be derived: pass protein_token_id=processor.protein_token_id"
                ) from error
            protein_token_id = add_protein_token(tokenizer)
        if protein_token_id >= text_config.vocab_size:
            # e.g. the id a SepitProcessor gave `<protein>` when it added the token to the LLM tokenizer
            causal_lm.resize_token_embeddings(protein_token_id + 1, mean_resizing=True)
        config = SepitConfig(
            protein_config=protein_model.config,
            text_config=causal_lm.config,
            protein_token_id=protein_token_id,
            **config_kwargs,
        )
        with torch.device("meta"):
            model = cls(config)
        model.model.protein_model = protein_model
        model.model.language_model = causal_lm.get_decoder()
        init_routers_too(model.model.language_model)
        model.lm_head = causal_lm.get_output_embeddings()
        for fresh, dtype in (
            (model.model.structure_module, protein_model.dtype),
            (model.model.multi_modal_projector, causal_lm.dtype),
        ):
            if fresh is None:  # sequence-only: no structure module
                continue
            fresh.to_empty(device=protein_model.device)
            fresh.apply(model._init_weights)
            fresh.to(dtype)
        return model


# For custom-code models `generate` calls `inspect.signature(self.forward)` at every decoding step (transformers 5.24
# checks for a removed `cache_position` argument); a precomputed `__signature__` (PEP 362) makes that lookup cheap.
SepitForConditionalGeneration.forward.__signature__ = inspect.signature(SepitForConditionalGeneration.forward)

__all__ = ["SepitForConditionalGeneration", "SepitModel", "SepitPreTrainedModel"]
