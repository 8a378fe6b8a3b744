"""SEPIT's structure module: pairwise C-alpha distances -> Gaussian kernels -> per-head attention bias.

The kernels of every residue pair (K of them) are never held for the whole protein at once: query rows are processed
in chunks of at most `structure_chunk_size` kernel values (pairs x K), each written into one preallocated bias, and
under autograd each chunk is recomputed in the backward pass (activation checkpointing). Memory is the bias itself
(N x heads x L x L) plus one chunk's temporaries, a fixed budget: it does not grow with K.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration_sepit import SepitConfig


class SepitGaussianKernels(nn.Module):
    """K learnable Gaussian basis functions of a distance (means and widths in Angstrom)."""

    def __init__(self, num_kernels: int):
        super().__init__()
        self.means = nn.Parameter(torch.empty(num_kernels))
        self.stds = nn.Parameter(torch.empty(num_kernels))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        std = self.stds.float().abs() + 1e-3
        z = (distances.float().unsqueeze(-1) - self.means.float()) / std
        return torch.exp(-0.5 * z.square()) / (math.sqrt(2 * math.pi) * std)


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
        self, query_coords: torch.Tensor, key_coords: torch.Tensor, query_mask: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bias (N, heads, rows, P) and kernel sums over keys (N, rows, K) for one block of query rows."""
        distances = (query_coords.unsqueeze(2) - key_coords.unsqueeze(1)).norm(dim=-1)
        kernels = self.gaussian_kernels(distances).to(self.kernel_proj_in.weight.dtype)
        bias = self.kernel_proj_out(F.gelu(self.kernel_proj_in(kernels)))
        pair_mask = query_mask.unsqueeze(2) & key_mask.unsqueeze(1)
        bias = bias.masked_fill(~pair_mask.unsqueeze(-1), 0.0).permute(0, 3, 1, 2)
        kernel_sums = None
        if self.embedding_scale != 0:
            kernel_sums = (kernels * key_mask[:, None, :, None].to(kernels.dtype)).sum(dim=2)
        return bias, kernel_sums

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
        if not bool(coords_mask.any()):
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
        kernel_sums = []
        for start in range(0, length, rows):
            block = slice(start, start + rows)
            args = (coords[:, block], coords, query_mask[:, block], key_mask)
            bias, sums = (
                checkpoint(self._pair_chunk, *args, use_reentrant=False) if recompute else self._pair_chunk(*args)
            )
            attention_bias[:, :, block] = bias
            kernel_sums.append(sums)

        embedding_term = None
        if self.embedding_scale != 0:
            summed = torch.cat(kernel_sums, dim=1).to(self.embedding_proj.weight.dtype)
            embedding_term = self.embedding_proj(summed) * self.embedding_scale
            embedding_term = embedding_term.masked_fill(~coords_mask.unsqueeze(-1), 0.0)
        return attention_bias, embedding_term


__all__ = ["SepitGaussianKernels", "SepitStructureModule"]
