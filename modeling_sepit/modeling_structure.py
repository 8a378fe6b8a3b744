"""SEPIT's structure module: pairwise C-alpha distances -> Gaussian kernels -> per-head attention bias.

The kernels of every residue pair (K of them) are never held for the whole protein at once: query rows are processed
in chunks of at most `structure_chunk_size` kernel values (pairs x K), each written into one preallocated bias, and
under autograd each chunk is recomputed in the backward pass (activation checkpointing). Memory is the bias itself
(N x heads x L x L) plus one chunk's temporaries, a fixed budget: it does not grow with K.

A pair's bias and kernels depend on its distance alone, so they are symmetric: a block of query rows computes only
the keys from its own first row on and takes the rest from the transpose of the rows above it, about half the work.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils.import_utils import is_tracing

from .configuration_sepit import SepitConfig

EXPONENT_FLOOR = -80.0


class SepitGaussianKernels(nn.Module):
    """K learnable Gaussian basis functions of a distance (means and widths in Angstrom)."""

    def __init__(self, num_kernels: int):
        super().__init__()
        self.means = nn.Parameter(torch.empty(num_kernels))
        self.stds = nn.Parameter(torch.empty(num_kernels))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        std = self.stds.float().abs() + 1e-3
        z = (distances.float().unsqueeze(-1) - self.means.float()) / std
        # Most pairs lie many widths from most means; `exp` of such arguments takes the CPU's slow underflow path
        # (9x slower here). Below -80 the kernel is under 2e-35: clamping changes nothing a float32 model can use.
        return torch.exp((-0.5 * z.square()).clamp(min=EXPONENT_FLOOR)) / (math.sqrt(2 * math.pi) * std)


class SepitStructureModule(nn.Module):
    """Turns C-alpha coordinates into an attention bias (shared by every ESM layer) and a residue embedding term."""

    def __init__(self, config: SepitConfig):
        super().__init__()
        kernels = config.num_gaussian_kernels
        heads = config.protein_config.num_attention_heads
        self.embedding_scale = config.structure_embedding_scale
        self.chunk_size = config.structure_chunk_size
        self.original_compat = config.original_compat
        self.gaussian_kernels = SepitGaussianKernels(kernels)
        self.kernel_proj_in = nn.Linear(kernels, kernels)
        self.kernel_proj_out = nn.Linear(kernels, heads)
        self.embedding_proj = nn.Linear(kernels, config.protein_config.hidden_size)

    def _pair_chunk(
        self, block_coords: torch.Tensor, key_coords: torch.Tensor, block_mask: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """For a block of query rows and the keys from the block's first row on: the unmasked bias (N, heads, rows,
        keys), each row's kernel sum over the keys (N, rows, K) and each key's kernel sum over the block's rows
        (N, keys, K), which the rows below the block take by symmetry. Sums count the masks' residues only."""
        distances = (block_coords.unsqueeze(2) - key_coords.unsqueeze(1)).norm(dim=-1)
        kernels = self.gaussian_kernels(distances).to(self.kernel_proj_in.weight.dtype)
        bias = self.kernel_proj_out(F.gelu(self.kernel_proj_in(kernels))).permute(0, 3, 1, 2)
        if self.embedding_scale == 0:
            return bias, None, None
        row_sums = (kernels * key_mask[:, None, :, None].to(kernels.dtype)).sum(dim=2)
        key_sums = (kernels * block_mask[:, :, None, None].to(kernels.dtype)).sum(dim=1)
        return bias, row_sums, key_sums

    def forward(
        self, coords: torch.Tensor, coords_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            coords: (N, P, 3) C-alpha coordinates aligned with the protein tokens.
            coords_mask: (N, P) bool, True where a residue has coordinates.

        Returns:
            The attention bias (N, heads, P, P) and the embedding term (N, P, hidden), or `(None, None)` when no
            residue has coordinates, so that the encoder is exactly ESM-2.
        """
        if not is_tracing() and not bool(coords_mask.any()):  # traced: computed anyway, zero where masked
            return None, None
        num_proteins, length, _ = coords.shape
        coords = coords.float().masked_fill(~coords_mask.unsqueeze(-1), 0.0)
        key_mask = coords_mask
        query_mask = coords_mask
        if self.original_compat:
            # The release biases the [1:-1] block of the padded length, for queries with or without coordinates.
            inner = torch.zeros(length, dtype=torch.bool, device=coords.device)
            inner[1:-1] = True
            key_mask = coords_mask & inner
            query_mask = inner.expand(num_proteins, length)

        rows = max(1, self.chunk_size // (length * self.gaussian_kernels.means.numel()))
        recompute = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        heads = self.kernel_proj_out.out_features
        attention_bias = coords.new_empty(
            (num_proteins, heads, length, length), dtype=self.kernel_proj_out.weight.dtype
        )
        row_sums = []
        # Kernel sums that the rows below each block owe to its keys (by symmetry the block skips those pairs).
        earlier = None
        if self.embedding_scale != 0:
            earlier = coords.new_zeros((num_proteins, length, self.gaussian_kernels.means.numel()))
        for start in range(0, length, rows):
            end = min(start + rows, length)
            args = (coords[:, start:end], coords[:, start:], key_mask[:, start:end], key_mask[:, start:])
            bias, sums, key_sums = (
                checkpoint(self._pair_chunk, *args, use_reentrant=False) if recompute else self._pair_chunk(*args)
            )
            attention_bias[:, :, start:end, start:] = bias
            if start:  # keys before the block are rows of earlier blocks, whose bias holds these pairs transposed
                attention_bias[:, :, start:end, :start] = attention_bias[:, :, :start, start:end].transpose(-1, -2)
            if sums is not None:
                row_sums.append(sums + earlier[:, start:end])
                earlier[:, end:] += key_sums[:, end - start :]
        pair_mask = query_mask.unsqueeze(2) & key_mask.unsqueeze(1)
        attention_bias = attention_bias.masked_fill(~pair_mask.unsqueeze(1), 0.0)

        embedding_term = None
        if self.embedding_scale != 0:
            summed = torch.cat(row_sums, dim=1).to(self.embedding_proj.weight.dtype)
            embedding_term = self.embedding_proj(summed) * self.embedding_scale
            embedding_term = embedding_term.masked_fill(~coords_mask.unsqueeze(-1), 0.0)
        return attention_bias, embedding_term


__all__ = ["SepitGaussianKernels", "SepitStructureModule"]
