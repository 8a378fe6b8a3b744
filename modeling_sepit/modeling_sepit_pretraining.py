"""SEPIT stage 0, encoder warm-up: the structure-aware ESM-2 encoder trained alone, before any LLM, on three tasks.

- Contrastive protein-caption alignment: symmetric InfoNCE between mean-pooled residue features and mean-pooled
  features of a frozen text encoder (PubMedBERT in the paper), negatives gathered across processes.
- Coordinate denoising: C-alpha coordinates are perturbed with Gaussian noise and an SE(3)-equivariant head over the
  structure-biased attention predicts the noise (Transformer-M / Uni-Mol style).
- Masked-residue prediction over the ESM vocabulary, by ESM-2's own pretrained masked-LM head (the original trains a
  fresh 512-way head: `masked_residue_head_type="original"`).

The encoder sits under the parameter names of [`SepitForConditionalGeneration`] (`model.protein_model.*`,
`model.structure_module.*`); [`load_pretrained_encoder`] copies it from a stage-0 folder into a stage-1 model.
"""

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, EsmForMaskedLM, EsmModel, PreTrainedTokenizerBase
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.modeling_outputs import ModelOutput
from transformers.models.esm.modeling_esm import EsmLMHead

from .configuration_sepit import SepitConfig
from .modeling_sepit import (
    SepitForConditionalGeneration,
    SepitModel,
    SepitPreTrainedModel,
    unused_protein_weights,
    validate_protein_inputs,
)
from .modeling_structure import SepitStructureModule
from .processing_sepit import to_protein_input

# CLIP's bounds on the logit scale: at most 100, i.e. a temperature of at least 0.01.
MAX_LOGIT_SCALE = math.log(100.0)
# "esm": ESM-2's pretrained masked-LM head; "original": the original's fresh Linear-GELU-LayerNorm-Linear head.
MASKED_RESIDUE_HEAD_TYPES = ("esm", "original")


@strict
class SepitProteinPretrainingConfig(SepitConfig):
    r"""
    Configuration of [`SepitForProteinPretraining`] (SEPIT stage 0). The encoder fields (`protein_config`,
    `num_gaussian_kernels`, `structure_embedding_scale`, `structure_chunk_size`) are those of [`SepitConfig`], so the
    stage-1 model is built with the same values; `text_config` (the LLM) and `protein_feature_layer` (stage 0 reads
    the last hidden state, as the original) are not used here.

    Args:
        text_encoder_config (`PreTrainedConfig` or `dict`): the frozen caption encoder, any `AutoModel` text encoder
            (default `bert`; the paper uses PubMedBERT).
        projection_dim (`int`): width of the shared protein-caption embedding space.
        logit_scale_init_value (`float`): initial log of the contrastive logit scale (2.6592 = log(1 / 0.07), as
            CLIP and the original); the scale is clamped to [1, 100].
        coordinate_noise_scale (`float`): standard deviation, in Angstrom, of the noise added to C-alpha
            coordinates (0.2 in the original).
        mlm_probability (`float`): fraction of residues replaced by `<mask>` (mask only, no random or kept tokens,
            as in the original stage 0).
        masked_residue_head_type (`str`): "esm" (default): ESM-2's masked-LM head over its vocabulary, which
            `from_pretrained_parts` takes pretrained from the ESM-2 checkpoint, so the masked-residue loss starts at
            ESM-2's own level and keeps what it learned; "original": the original's head, trained from scratch,
            Linear(hidden, projection_dim)-GELU-LayerNorm-Linear(projection_dim, projection_dim), whose
            `projection_dim` logits (512 in the paper) are scored against ESM token ids (the ids beyond the
            vocabulary are never targets).
        position_head_dropout (`float`): dropout on the denoising head's attention probabilities (0.1 as in the
            original).
        contrastive_loss_weight, denoising_loss_weight, masked_residue_loss_weight (`float`): weights of the three
            losses in `loss`.
    """

    model_type = "sepit_protein_pretraining"
    # `SepitConfig` is registered for remote code; stage-0 folders are read by this package, not by remote code.
    _auto_class = None
    sub_configs_defaults = {
        **SepitConfig.sub_configs_defaults,
        "text_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    text_encoder_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    coordinate_noise_scale: float = 0.2
    mlm_probability: float = 0.15
    masked_residue_head_type: str = "esm"
    position_head_dropout: float = 0.1
    contrastive_loss_weight: float = 1.0
    denoising_loss_weight: float = 1.0
    masked_residue_loss_weight: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_pretraining()

    def validate_pretraining(self) -> None:
        """Fail at construction, naming the field, rather than with NaN losses or shape errors in training."""
        if self.original_compat:
            raise ValueError(
                "original_compat=True reproduces the released checkpoints' padding quirks; encoder pretraining needs "
                "original_compat=False"
            )
        if self.protein_config.mask_token_id is None:
            raise ValueError(
                "protein_config.mask_token_id is None: masked-residue prediction needs the id of the ESM tokenizer's "
                "<mask> token there"
            )
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")
        if not self.coordinate_noise_scale > 0:
            raise ValueError(f"coordinate_noise_scale must be > 0 (Angstrom), got {self.coordinate_noise_scale}")
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {self.mlm_probability}")
        if self.masked_residue_head_type not in MASKED_RESIDUE_HEAD_TYPES:
            raise ValueError(
                f"masked_residue_head_type must be one of {list(MASKED_RESIDUE_HEAD_TYPES)}, got "
                f"{self.masked_residue_head_type!r}"
            )
        vocabulary = self.protein_config.vocab_size
        if self.masked_residue_head_type == "original" and self.projection_dim < vocabulary:
            raise ValueError(
                f"masked_residue_head_type='original' scores projection_dim={self.projection_dim} logits against ESM "
                f"token ids; it needs projection_dim >= the ESM vocabulary ({vocabulary})"
            )
        if not 0.0 <= self.position_head_dropout < 1.0:
            raise ValueError(f"position_head_dropout must be in [0, 1), got {self.position_head_dropout}")
        for name in ("contrastive_loss_weight", "denoising_loss_weight", "masked_residue_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SepitProteinPretrainingOutput(ModelOutput):
    """
    loss: weighted sum of the three losses below.
    contrastive_loss: symmetric InfoNCE over the global batch (this process's rows).
    denoising_loss: mean squared error of the predicted unit noise over the residues that were noised.
    masked_residue_loss: cross-entropy over the masked residues.
    logits_per_protein: (proteins, captions of the global batch) scaled cosine similarities.
    masked_residue_logits: (proteins, P, ESM vocabulary) logits of the masked-input pass (projection_dim logits with
        `masked_residue_head_type="original"`).
    noise_prediction: (proteins, P, 3) predicted unit noise (coordinate noise / `coordinate_noise_scale`).
    protein_embeds, caption_embeds: (proteins, projection_dim) L2-normalised embeddings.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    denoising_loss: torch.FloatTensor | None = None
    masked_residue_loss: torch.FloatTensor | None = None
    logits_per_protein: torch.FloatTensor | None = None
    masked_residue_logits: torch.FloatTensor | None = None
    noise_prediction: torch.FloatTensor | None = None
    protein_embeds: torch.FloatTensor | None = None
    caption_embeds: torch.FloatTensor | None = None


def residue_mask(attention_mask: torch.Tensor) -> torch.BoolTensor:
    """Real residues: attended positions except each protein's first (`<cls>`) and last (`<eos>`), whatever the
    padding side."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    first = torch.where(mask, positions, mask.shape[1]).amin(-1, keepdim=True)
    last = torch.where(mask, positions, -1).amax(-1, keepdim=True)
    return mask & (positions != first) & (positions != last)


def masked_mean_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` is set (in float32), so padding never dilutes the average."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden_states.float() * weights).sum(1) / weights.sum(1)


def _all_gather_with_grad(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every process's rows of each tensor, concatenated in rank order, with gradients flowing back to the process
    that owns them; also this process's first row in the result. Batches may differ in size between processes."""
    # Imported here: builds of torch without distributed support lack this module.
    from torch.distributed.nn.functional import all_gather

    local = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    sizes = [int(size) for size in sizes]
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        parts = all_gather(F.pad(tensor, (0, 0, 0, longest - tensor.shape[0])))
        gathered.append(torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]))
    return gathered, sum(sizes[: dist.get_rank()])


def contrastive_loss(
    protein_embeds: torch.Tensor, caption_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE: each protein's own caption is its positive, every other caption of the global batch a
    negative (and vice versa). Returns the loss over this process's rows and its (proteins, all captions) logits.

    Under `torch.distributed` with more than one process, embeddings are all-gathered with their gradients, so each
    process's loss also trains the embeddings of the others; averaging gradients over processes (DDP) then gives
    the gradient of the global-batch loss.
    """
    all_proteins, all_captions, offset = protein_embeds, caption_embeds, 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        (all_proteins, all_captions), offset = _all_gather_with_grad(protein_embeds, caption_embeds)
    logits_per_protein = logit_scale * protein_embeds @ all_captions.T
    logits_per_caption = logit_scale * caption_embeds @ all_proteins.T
    labels = torch.arange(protein_embeds.shape[0], device=protein_embeds.device) + offset
    loss = (
        F.cross_entropy(logits_per_protein.float(), labels) + F.cross_entropy(logits_per_caption.float(), labels)
    ) / 2
    return loss, logits_per_protein


class SepitProteinEncoder(nn.Module):
    """The encoder of [`SepitModel`] (ESM-2 biased by the structure module), under the same parameter names, returning
    the last hidden state and the structure bias instead of projected features."""

    def __init__(self, config: SepitProteinPretrainingConfig):
        super().__init__()
        self.protein_model = EsmModel(config.protein_config, add_pooling_layer=False)
        self.structure_module = SepitStructureModule(config)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        coords: torch.Tensor,
        coords_mask: torch.BoolTensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last hidden state (N, P, hidden) and the attention bias (N, heads, P, P), None without coordinates."""
        embeddings = self.protein_model.embeddings(input_ids=input_ids, attention_mask=attention_mask)
        attention_bias, embedding_term = self.structure_module(coords, coords_mask)
        encoder_mask = attention_mask
        if embedding_term is not None:
            embeddings = embeddings + embedding_term.to(embeddings.dtype)
        if attention_bias is not None:
            padding = attention_mask[:, None, None, :] == 0
            encoder_mask = attention_bias.to(embeddings.dtype).masked_fill(padding, torch.finfo(embeddings.dtype).min)
        outputs = self.protein_model(inputs_embeds=embeddings, attention_mask=encoder_mask, return_dict=True)
        return outputs.last_hidden_state, attention_bias


class SepitContrastiveProjection(nn.Module):
    """Linear-GELU-Linear into the shared embedding space, as in the original."""

    def __init__(self, in_features: int, projection_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, projection_dim)
        self.act = ACT2FN["gelu"]
        self.linear_2 = nn.Linear(projection_dim, projection_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features.to(self.linear_1.weight.dtype))))


class SepitPositionHead(nn.Module):
    r"""
    SE(3)-equivariant coordinate-noise prediction from the encoder's last hidden state (Transformer-M / Uni-Mol, as in
    the original): per head, attention of residue i over residues j (scores plus the structure bias) weights the unit
    vectors (x_i - x_j) / |x_i - x_j| and the values of j, and one linear map, shared by the three axes, turns the
    (3, hidden) result into a 3-vector.

    The hidden states and the bias depend on coordinates through distances only, so rotating the input rotates the
    output and translating it changes nothing. Unlike the original, the three axes share one projection without bias
    (separate or biased projections are not equivariant), the sequence axis is not swapped with the batch axis, and
    residues without coordinates are neither attended nor used as directions.
    """

    def __init__(self, config: SepitProteinPretrainingConfig):
        super().__init__()
        hidden = config.protein_config.hidden_size
        self.num_heads = config.protein_config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.position_head_dropout)
        self.force_proj = nn.Linear(hidden, 1, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
        coords: torch.Tensor,
        coords_mask: torch.BoolTensor,
    ) -> torch.Tensor:
        """(N, P, 3) vectors; rows of residues without coordinates are zero."""
        num_proteins, length, _ = hidden_states.shape
        heads = (num_proteins, length, self.num_heads, self.head_dim)
        # Attention in float32: the probabilities multiply coordinates directly.
        query = self.q_proj(hidden_states).view(heads).transpose(1, 2).float()
        key = self.k_proj(hidden_states).view(heads).transpose(1, 2).float()
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2).float()
        scores = query @ key.transpose(-1, -2) * self.head_dim**-0.5
        if attention_bias is not None:
            scores = scores + attention_bias.float()
        # A finite fill keeps rows without any coordinates finite (uniform); their directions are all zero below.
        scores = scores.masked_fill(~coords_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self.dropout(scores.softmax(dim=-1))

        coords = coords.float().masked_fill(~coords_mask.unsqueeze(-1), 0.0)
        delta = coords.unsqueeze(2) - coords.unsqueeze(1)  # (N, i, j, 3): x_i - x_j
        pairs = coords_mask.unsqueeze(2) & coords_mask.unsqueeze(1)
        directions = (delta / (delta.norm(dim=-1, keepdim=True) + 1e-5)).masked_fill(~pairs.unsqueeze(-1), 0.0)
        # One axis at a time keeps the temporaries at (N, heads, P, P), the size of the attention itself.
        vectors = torch.stack([(probs * directions[..., axis].unsqueeze(1)) @ value for axis in range(3)], dim=2)
        vectors = vectors.permute(0, 3, 2, 1, 4).reshape(num_proteins, length, 3, self.num_heads * self.head_dim)
        prediction = self.force_proj(vectors.to(self.force_proj.weight.dtype)).squeeze(-1)
        return prediction.masked_fill(~coords_mask.unsqueeze(-1), 0.0)


class SepitOriginalMaskedResidueHead(nn.Module):
    """The original stage-0 masked-residue head, trained from scratch: Linear(hidden, projection_dim)-GELU-LayerNorm-
    Linear(projection_dim, projection_dim), giving `projection_dim` logits per position."""

    def __init__(self, config: SepitProteinPretrainingConfig):
        super().__init__()
        self.dense = nn.Linear(config.protein_config.hidden_size, config.projection_dim)
        self.act = ACT2FN["gelu"]
        self.layer_norm = nn.LayerNorm(config.projection_dim)
        self.decoder = nn.Linear(config.projection_dim, config.projection_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.act(self.dense(hidden_states))))


class SepitLogitScaleToVector(ConversionOps):
    """Loads `logit_scale` as shape (1,) whether the folder holds it 0-d (written before it became 1-d) or 1-d; its own
    reverse, so folders are saved 1-d."""

    @torch.no_grad()
    def convert(
        self,
        input_dict: dict[str, list[torch.Tensor]],
        source_patterns: list[str],
        target_patterns: list[str],
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        tensors = next(iter(input_dict.values()))
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(1)}

    @property
    def reverse_op(self) -> ConversionOps:
        return self


def _logit_scale_to_vector(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args) -> None:
    """`load_state_dict` pre-hook: a 0-d `logit_scale` (saved before it became 1-d) loads as shape (1,)."""
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


class SepitForProteinPretraining(SepitPreTrainedModel):
    """SEPIT stage 0: warms up the structure-aware encoder with contrastive, denoising and masked-residue losses.

    The caption encoder is frozen: no gradient, always in eval mode, saved with the model so a folder reloads whole.
    """

    config: SepitProteinPretrainingConfig
    # What the Trainer counts as input tokens (`include_num_input_tokens_seen`) and estimates FLOPs from.
    main_input_name = "protein_input_ids"

    def __init__(self, config: SepitProteinPretrainingConfig):
        super().__init__(config)
        self.model = SepitProteinEncoder(config)
        # Frozen: no gradient, and eval mode (see `train`).
        self.text_encoder = AutoModel.from_config(config.text_encoder_config).requires_grad_(False).eval()
        self.protein_projection = SepitContrastiveProjection(config.protein_config.hidden_size, config.projection_dim)
        self.caption_projection = SepitContrastiveProjection(
            config.text_encoder_config.hidden_size, config.projection_dim
        )
        # Shape (1,), not 0-d: FSDP2 cannot shard and DeepSpeed cannot broadcast scalar parameters. Older folders and
        # checkpoints hold a 0-d one: `SepitLogitScaleToVector` reshapes it in `from_pretrained`, the hook below in
        # `load_state_dict` (the Trainer's resume).
        self.logit_scale = nn.Parameter(torch.full((1,), config.logit_scale_init_value))
        self.register_load_state_dict_pre_hook(_logit_scale_to_vector)
        self.position_head = SepitPositionHead(config)
        if config.masked_residue_head_type == "original":
            self.masked_residue_head = SepitOriginalMaskedResidueHead(config)
        else:
            self.masked_residue_head = EsmLMHead(config.protein_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, EsmLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, SepitForProteinPretraining):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)

    def get_input_embeddings(self) -> nn.Embedding:
        """ESM-2's residue embeddings, the only token embeddings trained here (the caption encoder is frozen)."""
        return self.model.protein_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.protein_model.embeddings.word_embeddings = value

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "SepitForProteinPretraining | tuple":
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading replaces parameters with new ones that require grad: freeze the caption encoder again.
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.text_encoder.requires_grad_(False)
        return loaded

    def train(self, mode: bool = True) -> "SepitForProteinPretraining":
        super().train(mode)
        # Frozen, so without dropout: a caption always gets the same features.
        self.text_encoder.eval()
        return self

    def get_protein_embeddings(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor | None = None,
        protein_coords: torch.Tensor | None = None,
        protein_coords_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(proteins, projection_dim) L2-normalised embeddings: the encoder's last (layer-normed) hidden state, as in
        the original, mean-pooled over residues, without `<cls>`, `<eos>` and padding."""
        attention_mask, coords, coords_mask = self._validate_proteins(
            protein_input_ids, protein_attention_mask, protein_coords, protein_coords_mask
        )
        return self._protein_embeddings(protein_input_ids, attention_mask, coords, coords_mask)

    def get_caption_embeddings(
        self, caption_input_ids: torch.LongTensor, caption_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(captions, projection_dim) L2-normalised embeddings: frozen text-encoder features mean-pooled over the
        caption's tokens, without padding."""
        caption_attention_mask = _validate_captions(caption_input_ids, caption_attention_mask, len(caption_input_ids))
        return self._caption_embeddings(caption_input_ids, caption_attention_mask)

    def _protein_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        coords: torch.Tensor,
        coords_mask: torch.BoolTensor,
    ) -> torch.Tensor:
        hidden, _ = self.model(input_ids, attention_mask, coords, coords_mask)
        pooled = masked_mean_pool(hidden, residue_mask(attention_mask))
        return F.normalize(self.protein_projection(pooled), dim=-1)

    def _caption_embeddings(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.caption_projection(masked_mean_pool(hidden, attention_mask)), dim=-1)

    def _validate_proteins(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor | None,
        protein_coords: torch.Tensor | None,
        protein_coords_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.BoolTensor]:
        """Checked attention mask, coordinates and coordinate mask (zeros and all-False without coordinates)."""
        attention_mask, coords_mask = validate_protein_inputs(
            protein_input_ids, protein_attention_mask, protein_coords, protein_coords_mask
        )
        if protein_input_ids.shape[0] == 0:
            raise ValueError("protein_input_ids holds no proteins: pass a batch of at least one protein")
        empty = (~residue_mask(attention_mask).any(-1)).nonzero().flatten()
        if len(empty):
            raise ValueError(
                f"protein {int(empty[0])} has no residue between <cls> and <eos> in protein_input_ids / "
                "protein_attention_mask: tokenize non-empty sequences with the ESM tokenizer (special tokens added)"
            )
        if coords_mask is None:
            coords_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
            protein_coords = torch.zeros((*protein_input_ids.shape, 3), device=protein_input_ids.device)
        return attention_mask, protein_coords, coords_mask

    def forward(
        self,
        protein_input_ids: torch.LongTensor,
        protein_attention_mask: torch.Tensor | None = None,
        protein_coords: torch.FloatTensor | None = None,
        protein_coords_mask: torch.BoolTensor | None = None,
        caption_input_ids: torch.LongTensor | None = None,
        caption_attention_mask: torch.Tensor | None = None,
        masked_positions: torch.BoolTensor | None = None,
        coordinate_noise: torch.FloatTensor | None = None,
    ) -> SepitProteinPretrainingOutput:
        r"""
        protein_input_ids, protein_attention_mask, protein_coords, protein_coords_mask: as for
            [`SepitForConditionalGeneration`] (ESM tokens with `<cls>`/`<eos>`, C-alpha coordinates aligned to them).
        caption_input_ids, caption_attention_mask: one caption per protein, tokenised for the text encoder.
        masked_positions (`torch.BoolTensor` of shape `(proteins, P)`, *optional*): residues to replace by `<mask>`;
            drawn with probability `config.mlm_probability` among residues when not given.
        coordinate_noise (`torch.FloatTensor` of shape `(proteins, P, 3)`, *optional*): unit Gaussian noise; the
            coordinates move by `config.coordinate_noise_scale` times it. Drawn when not given.

        Two encoder passes, as in the original: clean tokens and coordinates for the contrastive embeddings; masked
        tokens and noised coordinates for the masked-residue and denoising heads. Noise goes to residues with
        coordinates that are not masked, and only they enter the denoising loss.
        """
        attention_mask, coords, coords_mask = self._validate_proteins(
            protein_input_ids, protein_attention_mask, protein_coords, protein_coords_mask
        )
        num_proteins = protein_input_ids.shape[0]
        if caption_input_ids is None:
            raise ValueError(
                "caption_input_ids is required: each protein is contrasted with its caption; tokenize one caption per "
                "protein with the text encoder's tokenizer"
            )
        caption_attention_mask = _validate_captions(caption_input_ids, caption_attention_mask, num_proteins)
        residues = residue_mask(attention_mask)
        masked_positions = self._masked_positions(masked_positions, residues)
        noised = coords_mask & residues & ~masked_positions
        if coordinate_noise is None:
            coordinate_noise = torch.randn(coords.shape, device=coords.device)
        elif tuple(coordinate_noise.shape) != tuple(coords.shape):
            raise ValueError(
                f"coordinate_noise has shape {tuple(coordinate_noise.shape)}; it must be (proteins, P, 3) = "
                f"{tuple(coords.shape)}, aligned with protein_input_ids"
            )
        elif not bool(torch.isfinite(coordinate_noise[noised]).all()):
            raise ValueError("coordinate_noise has NaN/inf at residues to be noised: pass finite unit Gaussian noise")

        protein_embeds = self._protein_embeddings(protein_input_ids, attention_mask, coords, coords_mask)
        caption_embeds = self._caption_embeddings(caption_input_ids, caption_attention_mask)
        logit_scale = self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()
        clip_loss, logits_per_protein = contrastive_loss(protein_embeds, caption_embeds, logit_scale)

        noise = torch.where(noised.unsqueeze(-1), coordinate_noise.to(coords.dtype), 0.0)
        noisy_coords = coords + self.config.coordinate_noise_scale * noise
        masked_ids = protein_input_ids.masked_fill(masked_positions, self.config.protein_config.mask_token_id)
        hidden, attention_bias = self.model(masked_ids, attention_mask, noisy_coords, coords_mask)

        masked_residue_logits = self.masked_residue_head(hidden)
        masked_residue_loss = F.cross_entropy(
            masked_residue_logits[masked_positions].float(), protein_input_ids[masked_positions], reduction="sum"
        ) / masked_positions.sum().clamp(min=1)

        # The target is the unit noise: the loss is about 1 for a zero prediction whatever the noise scale.
        noise_prediction = self.position_head(hidden, attention_bias, noisy_coords, coords_mask)
        squared_error = (noise_prediction[noised].float() - noise[noised].float()).square()
        denoising_loss = squared_error.sum() / (3 * noised.sum()).clamp(min=1)

        config = self.config
        loss = (
            config.contrastive_loss_weight * clip_loss
            + config.denoising_loss_weight * denoising_loss
            + config.masked_residue_loss_weight * masked_residue_loss
        )
        return SepitProteinPretrainingOutput(
            loss=loss,
            contrastive_loss=clip_loss,
            denoising_loss=denoising_loss,
            masked_residue_loss=masked_residue_loss,
            logits_per_protein=logits_per_protein,
            masked_residue_logits=masked_residue_logits,
            noise_prediction=noise_prediction,
            protein_embeds=protein_embeds,
            caption_embeds=caption_embeds,
        )

    def _masked_positions(self, masked_positions: torch.Tensor | None, residues: torch.BoolTensor) -> torch.BoolTensor:
        if masked_positions is None:
            draw = torch.rand(residues.shape, device=residues.device) < self.config.mlm_probability
            return draw & residues
        if tuple(masked_positions.shape) != tuple(residues.shape) or masked_positions.dtype != torch.bool:
            raise ValueError(
                f"masked_positions must be a bool tensor of shape (proteins, P) = {tuple(residues.shape)}, got "
                f"{masked_positions.dtype} of shape {tuple(masked_positions.shape)}"
            )
        outside = masked_positions & ~residues
        if bool(outside.any()):
            protein, position = (int(i) for i in outside.nonzero()[0])
            raise ValueError(
                f"masked_positions marks protein {protein}, position {position}, which is not a residue (padding, "
                "<cls> or <eos>): mask residues only"
            )
        return masked_positions

    @classmethod
    def from_pretrained_parts(
        cls, protein_model_name_or_path: str, text_encoder_name_or_path: str, **kwargs
    ) -> "SepitForProteinPretraining":
        """A stage-0 model from an ESM-2 checkpoint (its masked-LM head initialises `masked_residue_head`, unless
        `masked_residue_head_type="original"`, whose head is fresh) and a text encoder checkpoint (names or paths), with
        a fresh structure module, projections and position head.

        Keyword arguments go to `SepitProteinPretrainingConfig` when they name one of its fields, else to both
        `from_pretrained` calls (`dtype`, `revision`, `token`, ...).
        """
        # SEPIT's own fields: the generic ones (`dtype`, ...) are meant for loading.
        config_fields = (
            SepitProteinPretrainingConfig.__dataclass_fields__.keys() - PreTrainedConfig.__dataclass_fields__
        )
        config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in config_fields}
        masked_lm = EsmForMaskedLM.from_pretrained(protein_model_name_or_path, **kwargs)
        text_encoder = AutoModel.from_pretrained(text_encoder_name_or_path, **kwargs)
        config = SepitProteinPretrainingConfig(
            protein_config=masked_lm.config, text_encoder_config=text_encoder.config, **config_kwargs
        )
        with torch.device("meta"):
            model = cls(config)
        model.model.protein_model = masked_lm.esm
        model.text_encoder = text_encoder.requires_grad_(False)
        fresh = [model.model.structure_module, model.protein_projection, model.caption_projection, model.position_head]
        if config.masked_residue_head_type == "esm":
            head = masked_lm.lm_head
            # ESM ties its decoder to the input embeddings; here each is trained on its own.
            head.decoder.weight = nn.Parameter(head.decoder.weight.detach().clone())
            model.masked_residue_head = head
        else:
            fresh.append(model.masked_residue_head)
        device, dtype = masked_lm.device, masked_lm.dtype
        for module in fresh:
            module.to_empty(device=device)
            module.apply(model._init_weights)
            module.to(dtype)
        model.logit_scale = nn.Parameter(torch.full((1,), config.logit_scale_init_value, device=device, dtype=dtype))
        return model.eval()


register_checkpoint_conversion_mapping(
    SepitForProteinPretraining.__name__,
    [WeightConverter("logit_scale", "logit_scale", operations=[SepitLogitScaleToVector()])],
    overwrite=True,  # a reload of this module registers it again
)


def _validate_captions(
    caption_input_ids: torch.Tensor, caption_attention_mask: torch.Tensor | None, num_proteins: int
) -> torch.Tensor:
    """The caption attention mask (all ones when not given), checked against the ids and the number of proteins."""
    if caption_input_ids.ndim != 2 or caption_input_ids.shape[0] != num_proteins:
        raise ValueError(
            f"caption_input_ids must be (proteins, T) with one caption per protein: got shape "
            f"{tuple(caption_input_ids.shape)} for {num_proteins} proteins"
        )
    if caption_attention_mask is None:
        return torch.ones_like(caption_input_ids)
    if caption_attention_mask.shape != caption_input_ids.shape:
        raise ValueError(
            f"caption_attention_mask has shape {tuple(caption_attention_mask.shape)}; it must match caption_input_ids "
            f"{tuple(caption_input_ids.shape)}"
        )
    empty = (~caption_attention_mask.bool().any(-1)).nonzero().flatten()
    if len(empty):
        raise ValueError(
            f"caption {int(empty[0])} has no tokens in caption_attention_mask: give every protein a non-empty caption"
        )
    return caption_attention_mask


class SepitPretrainingCollator:
    r"""
    Stage-0 batches from caption rows (`sequence`, `coords`, `coords_mask`, `caption`, as in the dataset's `captions`
    config): ESM tokens with `<cls>`/`<eos>`, right-padded, C-alpha coordinates aligned to them as [`SepitProcessor`]
    aligns them (position 0 is `<cls>`; `<cls>`, `<eos>`, padding and residues without a structure are masked out),
    and each caption tokenised for the frozen text encoder. Masks and coordinate noise are drawn by the model, so a
    batch depends only on its rows.

    It is also the Trainer's `processing_class`: `save_pretrained` writes both tokenizers next to the model, so every
    checkpoint and the final folder are self-contained ([`from_pretrained`] reads them back), and `pad_token_id` lets
    the Trainer count non-padding protein tokens (`include_num_input_tokens_seen="non_padding"`).

    Args:
        protein_tokenizer: the ESM-2 tokenizer of the encoder.
        text_tokenizer: the tokenizer of the frozen caption encoder.
        max_protein_length (`int`): residues kept per protein (1022 for ESM-2: 1024 positions with `<cls>`, `<eos>`).
        max_caption_length (`int`): caption tokens kept (512 in the original, the BERT position limit).
        caption_column (`str`): the rows' caption field.
    """

    protein_tokenizer_folder = "protein_tokenizer"
    text_tokenizer_folder = "text_tokenizer"

    def __init__(
        self,
        protein_tokenizer: PreTrainedTokenizerBase,
        text_tokenizer: PreTrainedTokenizerBase,
        max_protein_length: int = 1022,
        max_caption_length: int = 512,
        caption_column: str = "caption",
    ):
        if max_protein_length < 1 or max_caption_length < 1:
            raise ValueError(
                f"max_protein_length and max_caption_length must be >= 1, got {max_protein_length} and "
                f"{max_caption_length}"
            )
        self.protein_tokenizer = protein_tokenizer
        self.text_tokenizer = text_tokenizer
        self.max_protein_length = max_protein_length
        self.max_caption_length = max_caption_length
        self.caption_column = caption_column

    @property
    def pad_token_id(self) -> int:
        return self.protein_tokenizer.pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        proteins = []
        for i, example in enumerate(examples):
            row = {key: example.get(key) for key in ("sequence", "coords", "coords_mask")}
            protein = to_protein_input(row, f"examples[{i}]")
            cut = slice(0, self.max_protein_length)
            coords = None if protein.coords is None else (protein.coords[cut], protein.coords_mask[cut])
            proteins.append((protein.sequence[cut], coords))
        encoded = self.protein_tokenizer(
            [sequence for sequence, _ in proteins], padding=True, padding_side="right", return_tensors="pt"
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        coords = torch.zeros((*input_ids.shape, 3))
        coords_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
        for i, (sequence, structure) in enumerate(proteins):
            if int(attention_mask[i].sum()) != len(sequence) + 2:
                raise ValueError(
                    f"examples[{i}]: the protein tokenizer did not give one token per residue plus <cls> and <eos>; "
                    "use the ESM-2 tokenizer"
                )
            if structure is not None:
                coords[i, 1 : 1 + len(sequence)] = torch.from_numpy(structure[0])
                coords_mask[i, 1 : 1 + len(sequence)] = torch.from_numpy(structure[1])
        captions = self.text_tokenizer(
            [example[self.caption_column] for example in examples],
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_caption_length,
            return_tensors="pt",
        )
        return {
            "protein_input_ids": input_ids,
            "protein_attention_mask": attention_mask,
            "protein_coords": coords,
            "protein_coords_mask": coords_mask,
            "caption_input_ids": captions["input_ids"],
            "caption_attention_mask": captions["attention_mask"],
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        self.protein_tokenizer.save_pretrained(Path(save_directory) / self.protein_tokenizer_folder, **kwargs)
        self.text_tokenizer.save_pretrained(Path(save_directory) / self.text_tokenizer_folder, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "SepitPretrainingCollator":
        """The tokenizers saved with a stage-0 folder or checkpoint (a path or Hub id); keyword arguments go to the
        collator (`max_protein_length`, ...)."""
        protein_tokenizer, text_tokenizer = (
            AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=folder)
            for folder in (cls.protein_tokenizer_folder, cls.text_tokenizer_folder)
        )
        return cls(protein_tokenizer, text_tokenizer, **kwargs)


def load_pretrained_encoder(
    model: SepitForConditionalGeneration | SepitModel, pretrained_model_name_or_path: str, **kwargs
) -> SepitForConditionalGeneration | SepitModel:
    """Copy the warmed-up encoder (ESM-2 and structure module) of a stage-0 folder into a SEPIT model (stage 1).

    Keyword arguments go to [`SepitForProteinPretraining.from_pretrained`]. The model's encoder must have the stage-0
    architecture: build it from the same ESM-2 checkpoint with the stage-0 `num_gaussian_kernels` and
    `structure_embedding_scale`.
    """
    source = SepitForProteinPretraining.from_pretrained(pretrained_model_name_or_path, **kwargs)
    target = model.model if isinstance(model, SepitForConditionalGeneration) else model
    ours, theirs = target.config.structure_embedding_scale, source.config.structure_embedding_scale
    if ours != theirs:
        raise ValueError(
            f"structure_embedding_scale is {ours} in the model but {theirs} in the stage-0 checkpoint "
            f"{pretrained_model_name_or_path}: build the model with structure_embedding_scale={theirs}"
        )
    # Stage 0 trains every ESM layer; SEPIT keeps those up to the projected one (`keep_feature_layers`).
    unused = [re.compile(pattern.removeprefix(r"protein_model\.")) for pattern in unused_protein_weights(target.config)]
    for name in ("protein_model", "structure_module"):
        if getattr(target, name) is None:  # a sequence-only model takes the warmed-up ESM-2 alone
            continue
        expected = {key: tuple(value.shape) for key, value in getattr(target, name).state_dict().items()}
        found = {
            key: tuple(value.shape)
            for key, value in getattr(source.model, name).state_dict().items()
            if name != "protein_model" or not any(pattern.match(key) for pattern in unused)
        }
        if expected != found:
            different = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
            raise ValueError(
                f"{name} of the model and of the stage-0 checkpoint {pretrained_model_name_or_path} differ at "
                f"{different[:5]} (shapes {[expected.get(k) for k in different[:5]]} vs "
                f"{[found.get(k) for k in different[:5]]}): build the model from the same ESM-2 checkpoint with the "
                "stage-0 num_gaussian_kernels"
            )
        getattr(target, name).load_state_dict(
            {key: value for key, value in getattr(source.model, name).state_dict().items() if key in expected}
        )
    return model


__all__ = [
    "MASKED_RESIDUE_HEAD_TYPES",
    "SepitForProteinPretraining",
    "SepitLogitScaleToVector",
    "SepitOriginalMaskedResidueHead",
    "SepitPositionHead",
    "SepitPretrainingCollator",
    "SepitProteinEncoder",
    "SepitProteinPretrainingConfig",
    "SepitProteinPretrainingOutput",
    "contrastive_loss",
    "load_pretrained_encoder",
    "residue_mask",
]
