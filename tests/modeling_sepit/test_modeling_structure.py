"""The structure module against a direct float64 computation of SEPIT's formula, on real C-alpha coordinates."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.modeling_structure import SepitStructureModule
from tests.conftest import tiny_config


def direct_formula(module: SepitStructureModule, coords: torch.Tensor, mask: torch.Tensor, scale: float):
    """bias[i,j] = MLP(g(|x_i - x_j|)) for residues i, j with coordinates; e_i = scale * W(sum_j g(d_ij))."""
    p = {name: t.detach().double() for name, t in module.named_parameters()}
    x = coords.double()
    dist = (x[:, :, None] - x[:, None, :]).norm(dim=-1)
    std = p["gaussian_kernels.stds"].abs() + 1e-3
    g = torch.exp(-0.5 * ((dist[..., None] - p["gaussian_kernels.means"]) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
    hidden = F.gelu(g @ p["kernel_proj_in.weight"].T + p["kernel_proj_in.bias"])
    bias = hidden @ p["kernel_proj_out.weight"].T + p["kernel_proj_out.bias"]
    pair = mask[:, :, None] & mask[:, None, :]
    bias = torch.where(pair[..., None], bias, 0.0).permute(0, 3, 1, 2)
    sums = (g * mask[:, None, :, None]).sum(2)
    emb = (sums @ p["embedding_proj.weight"].T + p["embedding_proj.bias"]) * scale
    return bias, torch.where(mask[..., None], emb, 0.0)


def make_module(**overrides) -> SepitStructureModule:
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config(**overrides))
    return model.model.structure_module


@pytest.mark.parametrize("chunk_size", [7, 4_194_304])
def test_bias_and_embedding_term_match_float64_formula(real_proteins, chunk_size):
    module = make_module(structure_chunk_size=chunk_size, structure_embedding_scale=0.5)
    sequence, ca = real_proteins[1]
    coords = ca[None]
    mask = torch.ones(1, len(sequence), dtype=torch.bool)
    mask[0, 10:14] = False  # an unresolved loop
    with torch.no_grad():
        bias, emb = module(coords, mask)
    ref_bias, ref_emb = direct_formula(module, coords, mask, 0.5)
    assert bias.shape == (1, 4, len(sequence), len(sequence))
    torch.testing.assert_close(bias.double(), ref_bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.double(), ref_emb, atol=1e-5, rtol=1e-5)


def test_chunked_backward_matches_direct_gradients(real_proteins):
    module = make_module(structure_chunk_size=50 * 16, structure_embedding_scale=0.5)
    _, ca = real_proteins[2]
    mask = torch.ones(1, ca.shape[0], dtype=torch.bool)
    bias, emb = module(ca[None], mask)
    (bias.square().sum() + emb.sum()).backward()
    chunked = {name: p.grad.clone() for name, p in module.named_parameters()}

    module.zero_grad()
    module.chunk_size = 10**9
    bias, emb = module(ca[None], mask)
    (bias.square().sum() + emb.sum()).backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_residues_without_coordinates_get_no_bias_and_no_embedding_term(real_proteins):
    module = make_module(structure_embedding_scale=0.5)
    _, ca = real_proteins[1]
    mask = torch.ones(1, ca.shape[0], dtype=torch.bool)
    mask[0, [0, 5, 50]] = False
    coords = ca[None].clone()
    with torch.no_grad():
        bias, emb = module(coords, mask)
        coords[0, [0, 5, 50]] = torch.tensor([1e4, -3.0, 7.0])  # whatever sits there is ignored
        bias2, emb2 = module(coords, mask)
    assert torch.equal(bias, bias2) and torch.equal(emb, emb2)
    assert bias[0, :, 5].abs().sum() == 0 and bias[0, :, :, 5].abs().sum() == 0
    assert emb[0, 5].abs().sum() == 0
    assert bias[0, :, 1, 2].abs().sum() > 0


def test_no_coordinates_at_all_gives_nothing():
    module = make_module()
    bias, emb = module(torch.zeros(2, 9, 3), torch.zeros(2, 9, dtype=torch.bool))
    assert bias is None and emb is None
