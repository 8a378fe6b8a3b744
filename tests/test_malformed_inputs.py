"""Malformed inputs, one table per component (issue 8): every library boundary answers a `ValueError` that names the
field and what would be valid, every CLI exits with code 2 and one `error:` line on stderr, never a traceback from
torch, numpy or a parser's internals.

Components: the processor, the `protein-qa` pipeline, structure loading, the model's config / checkpoint / forward
checks, the converter, the dataset builder and UniProt reader, and every CLI. Random byte-level corruption of real
structure files is fuzzed in tests/modeling_sepit/test_structure_loading.py (`test_corrupted_files_only_raise_value_
error`) and not repeated here; the property test below covers random *valid* processor inputs.
"""

import gzip
import json
import random
import runpy
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, pipeline

from dataset_card import build_dataset as build_dataset_module
from dataset_card import external_benchmarks
from dataset_card.build_dataset import BuildArguments, build_dataset
from dataset_card.uniprot_reader import ReadReport, iter_entries
from modeling_sepit import SepitConfig, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit import convert_original_sepit as converter
from modeling_sepit.structure_loading import load_structure
from tests.conftest import (
    ORIGINAL,
    PROTEIN_TOKEN_ID,
    ROOT,
    SCRIPTS,
    STRUCTURES,
    pad,
    prompt_ids,
    protein_batch,
    tiny_config,
)

UNIPROT = ROOT / "tests" / "fixtures" / "uniprot"
Q = "What is <protein> ?"
SEQ = "MKTAYIAK"  # 8 residues
DENSE, MOE = ORIGINAL / "original-tiny-dense", ORIGINAL / "original-tiny-moe-top1"
EXPERTS = "global_step100/layer_{}_expert_{}_mp_rank_00_model_states.pt"


def raises(call: Callable[[], object], fragments: list[str]) -> str:
    """`call()` raises a ValueError whose message holds every fragment (field name, what would be valid)."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def processor(protein_tokenizer) -> SepitProcessor:
    tokenizer = AutoTokenizer.from_pretrained(DENSE / "text_tokenizer")
    return SepitProcessor(tokenizer=tokenizer, protein_tokenizer=protein_tokenizer)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The dense fixture converted (model + processor), proteins padded to 48 positions."""
    folder = tmp_path_factory.mktemp("converted") / "dense"
    converter.convert(DENSE, folder, protein_padding_length=48)
    return folder


@pytest.fixture(scope="module")
def broken_checkpoints(converted, tmp_path_factory) -> dict[str, Path]:
    """Copies of the converted folder with one thing wrong each."""
    root = tmp_path_factory.mktemp("broken-checkpoints")
    folders = {}
    for name in ("no-weights", "garbage-weights", "truncated-weights", "no-config", "text-model-type", "act"):
        folders[name] = root / name
        shutil.copytree(converted, folders[name])
    weights = (converted / "model.safetensors").read_bytes()
    (folders["no-weights"] / "model.safetensors").unlink()
    (folders["garbage-weights"] / "model.safetensors").write_bytes(random.Random(0).randbytes(64))
    (folders["truncated-weights"] / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (folders["no-config"] / "config.json").unlink()
    for name, edit in (
        ("text-model-type", lambda config: config["text_config"].update(model_type="no-such-model")),
        ("act", lambda config: config.update(projector_hidden_act="no-such-activation")),
    ):
        config = json.loads((folders[name] / "config.json").read_text())
        edit(config)
        (folders[name] / "config.json").write_text(json.dumps(config))
    return folders


# --- processor -------------------------------------------------------------------------------------------------------


def ask(text: object, proteins: object, **kwargs) -> Callable[[SepitProcessor], object]:
    return lambda processor: processor(text=text, proteins=proteins, **kwargs)


def chat(messages: list, proteins: object) -> Callable[[SepitProcessor], object]:
    return lambda processor: processor.apply_chat_template(
        messages, proteins=proteins, add_generation_prompt=True, tokenize=True, return_dict=True
    )


def build(**kwargs) -> Callable[[SepitProcessor], object]:
    return lambda processor: SepitProcessor(processor.tokenizer, processor.protein_tokenizer, **kwargs)


CODES = "use uppercase one-letter codes from ABCDEFGHIKLMNOPQRSTUVWXYZ"
NAN8 = np.full((8, 3), np.nan)
ONES8 = np.ones(8, bool)

PROCESSOR_CASES = [
    pytest.param(ask(Q, "mktayiak"), ["proteins[0][0]", "'m' at 0", CODES], id="lowercase-sequence"),
    pytest.param(ask(Q, "MKT4YI*K"), ["'4' at 3, '*' at 6", CODES], id="digits-and-stop-in-sequence"),
    pytest.param(ask(Q, "MKT AYIAK"), ["' ' at 3"], id="space-in-sequence"),
    pytest.param(ask(Q, ""), ["proteins[0][0]", "empty", "one-letter amino-acid codes"], id="empty-sequence"),
    pytest.param(ask(Q, {"sequence": None}), ["proteins[0][0]", "not a string"], id="sequence-none"),
    pytest.param(ask(Q, {"sequence": 123}), ["proteins[0][0]", "not a string"], id="sequence-int"),
    pytest.param(ask(Q, {"sequence": SEQ, "coords": np.zeros((8, 2))}), ["(8, 2)", "(L, 3) = (8, 3)"], id="coords-L-2"),
    pytest.param(ask(Q, {"sequence": SEQ, "coords": np.zeros(24)}), ["(24,)", "(L, 3)"], id="coords-flat"),
    pytest.param(ask(Q, {"sequence": SEQ, "coords": "abc"}), ["coords must be numbers"], id="coords-a-string"),
    pytest.param(
        ask(Q, {"sequence": SEQ, "coords": [[0, 0, 0], [0, 0]]}), ["coords must be numbers"], id="coords-ragged"
    ),
    pytest.param(ask(Q, {"sequence": SEQ, "coords": np.zeros((7, 3))}), ["(7, 3)", "(8, 3)"], id="coords-wrong-length"),
    pytest.param(
        ask(Q, {"sequence": SEQ, "coords": NAN8, "coords_mask": ONES8}),
        ["NaN/inf", "coords_mask", "set coords_mask False there"],
        id="nan-coords-marked-present",
    ),
    pytest.param(
        ask(Q, {"sequence": SEQ, "coords": np.full((8, 3), np.inf), "coords_mask": ONES8}),
        ["NaN/inf at residues [0, 1, 2, 3, 4]"],
        id="inf-coords-marked-present",
    ),
    pytest.param(
        ask(Q, {"sequence": SEQ, "coords": np.zeros((8, 3)), "coords_mask": np.ones(7, bool)}),
        ["coords_mask has shape (7,)", "must be (8,)"],
        id="mask-coords-length-disagree",
    ),
    pytest.param(
        ask(Q, {"sequence": SEQ, "coords": np.zeros((8, 3)), "coords_mask": np.ones((8, 1), bool)}),
        ["coords_mask has shape (8, 1)"],
        id="mask-2d",
    ),
    pytest.param(
        ask(Q, {"sequence": SEQ, "coords_mask": ONES8}), ["coords_mask given without coords"], id="mask-no-coords"
    ),
    pytest.param(ask("<protein> vs <protein>", SEQ), ["2 `<protein>` tags but 1 proteins"], id="two-tags-one-protein"),
    pytest.param(ask(Q, [SEQ, SEQ]), ["1 `<protein>` tags but 2 proteins"], id="one-tag-two-proteins"),
    pytest.param(ask(Q, None), ["1 `<protein>` tags but 0 proteins"], id="tag-without-protein"),
    pytest.param(ask("What is it ?", SEQ), ["0 `<protein>` tags but 1 proteins"], id="protein-without-tag"),
    pytest.param(ask([Q, Q], [[SEQ, SEQ], []]), ["text[0]: 1 `<protein>` tags but 2 proteins"], id="nested-groups-off"),
    pytest.param(ask("", []), ["text[0]: empty question", "non-empty string"], id="empty-question"),
    pytest.param(ask("  \n ", []), ["text[0]: empty question"], id="whitespace-question"),
    pytest.param(ask(None, []), ["text: no question given"], id="no-question"),
    pytest.param(ask(42, []), ["text: got int", "string (or list of strings)"], id="question-an-int"),  # fixed
    pytest.param(ask([42], []), ["text[0]", "not a string"], id="question-list-of-int"),
    pytest.param(ask(Q, {"seq": SEQ}), ["unknown keys ['seq']", "use sequence, coords"], id="unknown-protein-key"),
    pytest.param(ask(Q, 42), ["cannot read a protein from int", "a sequence string"], id="protein-an-int"),
    pytest.param(ask(Q, b"MKT"), ["cannot read a protein from bytes"], id="protein-bytes"),
    pytest.param(
        ask(Q, str(STRUCTURES / "nowhere.pdb")), ["nowhere.pdb: no such structure file"], id="structure-missing"
    ),
    pytest.param(
        ask(Q, (str(STRUCTURES / "graphein__4hhb.pdb"), "Z")),
        ["no protein chain 'Z'", "available: 'A', 'B', 'C', 'D'"],
        id="structure-unknown-chain",
    ),
    pytest.param(
        ask(Q, {"structure": str(STRUCTURES / "biotite__1aki.pdb"), "sequence": "W" * 60}),
        ["does not match the sequence", "90% required"],
        id="structure-other-protein",
    ),
    pytest.param(ask(Q, SEQ, return_tensors="tf"), ["return_tensors='tf'", "'pt'"], id="return-tensors-tf"),
    pytest.param(ask(Q, SEQ, padding_side="middle"), ["padding_side", "'left'", "'right'"], id="padding-side"),
    pytest.param(chat([], None), ["conversation: give a non-empty list"], id="chat-no-messages"),
    pytest.param(chat([{"role": "user"}], [SEQ]), ["conversation[0]", "'role' and 'content'"], id="chat-no-content"),
    pytest.param(
        chat([{"role": "user", "content": " "}], []), ["conversation[0]", "non-empty"], id="chat-empty-question"
    ),  # fixed
    pytest.param(
        chat([{"role": "user", "content": None}], []),
        ["conversation[0]", "must be a string"],
        id="chat-content-none",
    ),  # fixed
    pytest.param(
        chat([{"role": "user", "content": "<protein> <protein>"}], [SEQ]), ["2 `<protein>` tags"], id="chat-tag-count"
    ),
    pytest.param(
        build(max_protein_length=0), ["max_protein_length must be an integer >= 1"], id="max-length-0"
    ),  # fixed
    pytest.param(build(protein_pooling=0), ["protein_pooling must be an integer >= 1"], id="pooling-0"),
    pytest.param(build(protein_padding_length=8), ["protein_padding_length=8", "1024 positions"], id="padding-short"),
]


@pytest.mark.parametrize(("call", "fragments"), PROCESSOR_CASES)
def test_processor_rejects(processor, call, fragments):
    raises(lambda: call(processor), fragments)


@pytest.mark.parametrize("with_coords", [False, True], ids=["100k-residues-truncated-not-an-error", "with-coords"])
def test_processor_truncates_a_100k_residue_protein(processor, with_coords, caplog):
    """Valid, only too long: cut to max_protein_length (with its coordinates), with a warning, never a crash."""
    protein = {"sequence": "A" * 100_000}
    if with_coords:
        protein["coords"] = np.random.default_rng(0).normal(size=(100_000, 3))
    out = processor(text=Q, proteins=protein)
    positions = processor.max_protein_length + 2
    assert out["protein_input_ids"].shape == (1, positions)
    assert int((out["input_ids"] == processor.protein_token_id).sum()) == positions
    if with_coords:
        assert (
            out["protein_coords"].shape == (1, positions, 3) and int(out["protein_coords_mask"].sum()) == positions - 2
        )


AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWYX"


@st.composite
def valid_protein(draw):
    """A valid protein: 1..200 residues over the 20 amino acids + X, bare, or with finite coordinates and a mask."""
    sequence = draw(st.text(alphabet=AMINO_ACIDS, min_size=1, max_size=200))
    kind = draw(st.sampled_from(["sequence", "coords", "coords+mask"]))
    if kind == "sequence":
        return sequence
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    protein = {"sequence": sequence, "coords": rng.uniform(-999, 999, size=(len(sequence), 3)).astype(np.float32)}
    if kind == "coords+mask":
        protein["coords_mask"] = rng.random(len(sequence)) < draw(st.floats(0, 1))
    return protein


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.lists(st.lists(valid_protein(), min_size=0, max_size=3), min_size=1, max_size=3))
def test_random_valid_processor_inputs_never_raise(processor, groups):
    texts = ["Compare " + " and ".join(["<protein>"] * len(group)) + " ." for group in groups]
    out = processor(text=texts, proteins=groups, padding=True, padding_side="left")
    placeholders = (out["input_ids"] == processor.protein_token_id).sum(-1)
    flat = [protein for group in groups for protein in group]
    if not flat:
        assert int(placeholders.sum()) == 0 and "protein_input_ids" not in out
        return
    positions = out["protein_attention_mask"].sum(-1)  # feature positions: <cls>, residues, <eos>
    lengths = [len(p if isinstance(p, str) else p["sequence"]) + 2 for p in flat]
    assert positions.tolist() == lengths
    start = 0
    for row, group in enumerate(groups):  # each text holds its own proteins' feature positions
        assert int(placeholders[row]) == int(positions[start : start + len(group)].sum())
        start += len(group)
    if "protein_coords" in out:
        assert torch.isfinite(out["protein_coords"]).all()
        assert not (out["protein_coords_mask"] & ~out["protein_attention_mask"].bool()).any()


# --- protein-qa pipeline ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa(converted):
    return pipeline("protein-qa", model=str(converted), trust_remote_code=True)


def request(**fields) -> dict:
    return {"question": "What is it ?", "sequence": SEQ, **fields}


PIPELINE_CASES = [
    pytest.param({"sequence": SEQ}, {}, ["question: missing or empty"], id="no-question"),
    pytest.param(request(question=""), {}, ["question: missing or empty", "non-empty question"], id="empty-question"),
    pytest.param(request(question=" \t"), {}, ["question: missing or empty"], id="whitespace-question"),
    pytest.param(request(question=7), {}, ["question: missing or empty"], id="question-an-int"),
    pytest.param({"question": "What ?"}, {}, ["no protein given", "'sequence', 'structure'"], id="no-protein"),
    pytest.param(request(question="<protein> or <protein> ?"), {}, ["2 `<protein>` tags but one"], id="two-tags"),
    pytest.param(request(chain="A"), {}, ["chain: given without a structure", "'structure': path"], id="chain-alone"),
    pytest.param(request(colour="red"), {}, ["unknown input keys ['colour']"], id="unknown-key"),
    pytest.param(request(sequence="mktayiak"), {}, ["protein: invalid amino-acid letters", CODES], id="lowercase"),
    pytest.param(request(sequence="MKTB1"), {}, ["'1' at 4"], id="invalid-letter"),
    pytest.param(request(sequence=""), {}, ["protein: the sequence is empty"], id="empty-sequence"),
    pytest.param(request(coords=np.zeros((8, 2))), {}, ["(8, 2)", "(L, 3)"], id="coords-L-2"),
    pytest.param(request(coords=np.zeros((9, 3))), {}, ["(9, 3)", "(8, 3)"], id="coords-wrong-length"),
    pytest.param(request(coords=NAN8, coords_mask=ONES8), {}, ["NaN/inf", "coords_mask"], id="nan-marked-present"),
    pytest.param(request(coords_mask=ONES8), {}, ["coords_mask given without coords"], id="mask-without-coords"),
    pytest.param(
        {"question": "What ?", "structure": str(STRUCTURES / "nowhere.cif")},
        {},
        ["nowhere.cif"],
        id="structure-missing",
    ),
    pytest.param(
        {"question": "What ?", "structure": str(STRUCTURES / "biopython__2BEG.pdb")},
        {},
        ["several protein chains", "pass chain="],
        id="structure-several-chains",
    ),
    pytest.param(
        {"question": "What ?", "structure": str(STRUCTURES / "graphein__4hhb.cif"), "chain": "Q"},
        {},
        ["no protein chain 'Q'", "available"],
        id="structure-unknown-chain",
    ),
    pytest.param(
        request(), {"max_new_tokens": 10**9}, ["max_new_tokens must be an integer in [1, 4096]"], id="huge-mnt"
    ),
    pytest.param(request(), {"max_new_tokens": 0}, ["max_new_tokens", "got 0"], id="zero-max-new-tokens"),
    pytest.param(request(), {"max_new_tokens": 2.5}, ["max_new_tokens", "got 2.5"], id="float-max-new-tokens"),
    pytest.param("What is this protein ?", {}, ["inputs must be dicts"], id="a-bare-string"),
    pytest.param([], {}, ["an empty list", "non-empty list"], id="empty-batch"),  # fixed: was an IndexError
    pytest.param(
        [request(), request(sequence="MKT-AYI")], {"batch_size": 2}, ["'-' at 3"], id="one-bad-request-in-a-batch"
    ),
]


@pytest.mark.parametrize(("inputs", "kwargs", "fragments"), PIPELINE_CASES)
def test_pipeline_rejects(qa, inputs, kwargs, fragments):
    raises(lambda: qa(inputs, **kwargs), fragments)


def test_pipeline_answers_about_a_100k_residue_protein_truncated_not_an_error(qa):
    assert isinstance(qa(request(sequence="G" * 100_000), max_new_tokens=1)[0]["answer"], str)


def test_pipeline_on_a_checkpoint_without_weights_names_the_file(broken_checkpoints):
    # transformers' pipeline() wraps the loader's errors in its own ValueError; the model's message is in it.
    raises(
        lambda: pipeline("protein-qa", model=str(broken_checkpoints["no-weights"]), trust_remote_code=True),
        ["no model weights"],
    )


# --- structure loading -----------------------------------------------------------------------------------------------

PDB, CIF = STRUCTURES / "biotite__1aki.pdb", STRUCTURES / "biotite__1aki.cif"
WATERS = (
    b"HETATM    1  O   HOH A   1      11.000  11.000  11.000  1.00 20.00           O\n"
    b"HETATM    2 ZN    ZN A   2      13.000  13.000  13.000  1.00 20.00          ZN\nEND\n"
)


def dna_only() -> bytes:
    lines = (STRUCTURES / "biopython__1LCD.pdb").read_text().splitlines()
    return ("\n".join(line for line in lines if line.startswith("ATOM") and line[21] in "BC") + "\nEND\n").encode()


# (file name, its bytes from the real files, chain) -> message fragments; every file is built in tmp_path
STRUCTURE_CASES = [
    pytest.param(
        "cut.pdb", lambda: PDB.read_bytes()[:300], None, ["cut.pdb: no ATOM/HETATM records"], id="pdb-cut-in-header"
    ),
    pytest.param(
        "cut.pdb",
        lambda: PDB.read_bytes()[:50_000],
        None,
        ["cut.pdb: cannot read the atoms as PDB"],
        id="pdb-cut-in-atoms",
    ),
    pytest.param(
        "cut.cif", lambda: CIF.read_bytes()[:300], None, ["cut.cif: no atom_site category"], id="cif-cut-in-header"
    ),
    pytest.param(
        "cut.cif",
        lambda: CIF.read_bytes()[:80_000],
        None,
        ["cut.cif: cannot read the atoms as mmCIF"],
        id="cif-cut-in-atoms",
    ),
    pytest.param("x.pdb", lambda: random.Random(1).randbytes(4096), None, ["x.pdb: binary content"], id="pdb-binary"),
    pytest.param("x.cif", lambda: random.Random(2).randbytes(4096), None, ["x.cif: binary content"], id="cif-binary"),
    pytest.param("x.pdb", lambda: PDB.read_bytes()[:2000] + b"\0" * 8, None, ["NUL bytes"], id="pdb-with-nul"),
    pytest.param("x.pdb", lambda: b"HEADER    caf\xe9\n", None, ["not UTF-8 at byte 13"], id="pdb-latin-1"),
    pytest.param("x.pdb", lambda: b"", None, ["x.pdb: the structure file is empty"], id="pdb-empty"),
    pytest.param("x.cif", lambda: b"\n \n", None, ["x.cif: the structure file is empty"], id="cif-blank"),
    pytest.param(
        "x.pdb.gz",
        lambda: gzip.compress(PDB.read_bytes())[:3000],
        None,
        ["x.pdb.gz: corrupt or truncated gzip"],
        id="pdb-gzip-truncated",
    ),
    pytest.param(
        "x.cif.gz",
        lambda: bytes(b ^ 0x5A if 20 < i < 60 else b for i, b in enumerate(gzip.compress(CIF.read_bytes()))),
        None,
        ["x.cif.gz: corrupt or truncated gzip"],
        id="cif-gzip-corrupt",
    ),
    pytest.param("x.cif.gz", lambda: CIF.read_bytes(), None, ["Not a gzipped file"], id="cif-gz-not-gzip"),
    pytest.param(
        "x.pdb.gz", lambda: gzip.compress(b""), None, ["the structure file is empty"], id="pdb-gzip-of-nothing"
    ),
    pytest.param(
        "x.pdb", lambda: CIF.read_bytes(), None, ["x.pdb: cannot read the atoms as PDB"], id="mmcif-named-pdb"
    ),
    pytest.param("x.cif", lambda: PDB.read_bytes(), None, ["x.cif: cannot parse as mmCIF"], id="pdb-named-cif"),
    pytest.param(
        "x.txt", lambda: PDB.read_bytes(), None, ["unknown structure file suffix", ".pdb, .ent"], id="txt-suffix"
    ),
    pytest.param("waters.pdb", lambda: WATERS, None, ["waters.pdb: no protein chain"], id="no-protein-chain-waters"),
    pytest.param("dna.pdb", dna_only, None, ["dna.pdb: no protein chain (no amino-acid"], id="no-protein-chain-dna"),
    pytest.param(
        "x.pdb", lambda: PDB.read_bytes(), "Z", ["no protein chain 'Z'", "available: 'A'"], id="pdb-unknown-chain"
    ),
    pytest.param(
        "x.cif", lambda: CIF.read_bytes(), "B", ["no protein chain 'B'", "available: 'A'"], id="cif-unknown-chain"
    ),
    pytest.param(
        "x.pdb",
        lambda: (STRUCTURES / "graphein__4hhb.pdb").read_bytes(),
        None,
        ["several protein chains ('A', 'B', 'C', 'D')", "pass chain="],
        id="several-chains-no-chain",
    ),
]


@pytest.mark.parametrize(("name", "content", "chain", "fragments"), STRUCTURE_CASES)
def test_structure_loading_rejects(tmp_path, name, content, chain, fragments):
    path = write(tmp_path / name, content())
    raises(lambda: load_structure(path, chain=chain), fragments)


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        pytest.param(lambda tmp: tmp / "missing.cif", ["missing.cif: no such structure file"], id="missing-file"),
        pytest.param(lambda tmp: tmp, ["is a directory, not a structure file"], id="a-directory"),
        pytest.param(lambda tmp: None, ["structure: expected a PDB/mmCIF file path, got NoneType"], id="none"),  # fixed
        pytest.param(lambda tmp: 42, ["got int", ".pdb, .ent, .cif"], id="an-int"),  # fixed
    ],
)
def test_structure_loading_rejects_paths(tmp_path, path, fragments):
    raises(lambda: load_structure(path(tmp_path)), fragments)


# --- model: config, checkpoint folders, forward ----------------------------------------------------------------------


def tiny_forward(real_proteins, protein_tokenizer, edit: Callable[[dict], None]) -> Callable[[], object]:
    """A tiny model's forward on two real proteins, after `edit` spoils the batch."""
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(tiny_config()).eval()
    proteins = real_proteins[1:]
    batch = protein_batch(proteins, protein_tokenizer)
    ids, mask = pad(prompt_ids([len(sequence) + 2 for sequence, _ in proteins]), side="left")
    batch.update(input_ids=ids, attention_mask=mask)
    edit(batch)
    return lambda: model(**batch)


def spoil_coords(batch: dict) -> None:
    batch["protein_coords"][0, 3] = float("nan")
    batch["protein_coords_mask"][0, 3] = True


MODEL_CASES = [
    pytest.param(
        lambda folders: SepitConfig(text_config={"model_type": "no-such-model"}),
        ["text_config.model_type='no-such-model'", "a causal LM's"],
        id="config-unknown-text-model-type",  # fixed: named no field, listed every model type
    ),
    pytest.param(
        lambda folders: SepitConfig(protein_config={"model_type": "no-such-model"}),
        ["protein_config.model_type='no-such-model'", "'esm'"],
        id="config-unknown-protein-model-type",
    ),
    pytest.param(
        lambda folders: SepitConfig(protein_config={"model_type": "llama"}),
        ["protein_config.model_type must be 'esm'"],
        id="config-protein-not-esm",
    ),
    pytest.param(
        lambda folders: tiny_config(projector_hidden_act="no-such-activation"),
        ["projector_hidden_act='no-such-activation'", "'gelu'"],
        id="config-unknown-activation",  # fixed: KeyError when the model was built
    ),
    pytest.param(lambda folders: tiny_config(protein_feature_layer=9), ["outside [-4, 3]"], id="config-feature-layer"),
    pytest.param(
        lambda folders: tiny_config(num_experts=2, num_experts_per_tok=3), ["[1, num_experts=2]"], id="config-top-k"
    ),
    pytest.param(lambda folders: tiny_config(num_gaussian_kernels=0), ["num_gaussian_kernels"], id="config-kernels-0"),
    pytest.param(
        lambda folders: SepitForConditionalGeneration.from_pretrained(folders["text-model-type"]),
        ["text_config.model_type='no-such-model'"],
        id="config-json-edited-model-type",
    ),
    pytest.param(
        lambda folders: SepitForConditionalGeneration.from_pretrained(folders["act"]),
        ["projector_hidden_act"],
        id="config-json-edited-activation",
    ),
    pytest.param(
        lambda folders: SepitForConditionalGeneration.from_pretrained(folders["no-weights"]),
        ["no-weights: no model weights (model.safetensors)", "save_pretrained"],
        id="checkpoint-missing-weights",  # fixed: OSError from transformers
    ),
    pytest.param(
        lambda folders: SepitForConditionalGeneration.from_pretrained(folders["garbage-weights"]),
        ["model.safetensors: not a readable safetensors file"],
        id="checkpoint-garbage-weights",  # fixed: SafetensorError naming no file
    ),
    pytest.param(
        lambda folders: SepitForConditionalGeneration.from_pretrained(folders["truncated-weights"]),
        ["model.safetensors: not a readable safetensors file"],
        id="checkpoint-truncated-weights",
    ),
    pytest.param(
        lambda folders: SepitForConditionalGeneration.from_pretrained(folders["no-config"]),
        ["no-config: no config.json"],
        id="checkpoint-missing-config",  # fixed: a default config was built, then a TypeError from torch
    ),
]


@pytest.mark.parametrize(("call", "fragments"), MODEL_CASES)
def test_model_rejects(broken_checkpoints, call, fragments):
    raises(lambda: call(broken_checkpoints), fragments)


FORWARD_CASES = [
    pytest.param(
        lambda b: b.update(input_ids=torch.where(b["input_ids"] == PROTEIN_TOKEN_ID, 5, b["input_ids"])),
        ["`input_ids` hold 0 `<protein>` tokens", "SepitProcessor"],
        id="no-placeholders-for-the-proteins",
    ),
    pytest.param(
        lambda b: b["input_ids"].__setitem__((0, -1), PROTEIN_TOKEN_ID),
        ["hold 82 `<protein>` tokens but the 2 proteins", "give 81 protein tokens"],
        id="one-placeholder-too-many",
    ),
    pytest.param(
        lambda b: [b.pop(k) for k in list(b) if k.startswith("protein_")],
        ["no `protein_input_ids` were given"],
        id="placeholders-without-proteins",
    ),
    pytest.param(
        lambda b: b.update(protein_coords=b["protein_coords"][..., :2]),
        ["protein_coords must have shape (num_proteins, P, 3)"],
        id="coords-L-2",
    ),
    pytest.param(spoil_coords, ["NaN/inf at protein 0, position 3", "set the mask to False"], id="nan-marked-present"),
    pytest.param(
        lambda b: b.update(protein_coords_mask=b["protein_coords_mask"][:, :-1]),
        ["protein_coords_mask must have shape"],
        id="mask-coords-disagree",
    ),
    pytest.param(
        lambda b: b.update(protein_coords=None),
        ["protein_coords_mask marks residues with coordinates but protein_coords is missing"],
        id="mask-without-coords",
    ),
]


@pytest.mark.parametrize(("edit", "fragments"), FORWARD_CASES)
def test_model_forward_rejects(real_proteins, protein_tokenizer, edit, fragments):
    raises(tiny_forward(real_proteins, protein_tokenizer, edit), fragments)


# --- converter -------------------------------------------------------------------------------------------------------


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return apply


def save_expert(value: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / EXPERTS.format(0, 0)
        torch.save(value(torch.load(path, weights_only=True)), path)

    return apply


CONVERTER_CASES = [
    pytest.param(
        MOE,
        lambda d: (d / EXPERTS.format(1, 3)).unlink(),
        {},
        ["global_step100: missing expert file layer_1_expert_3", "(layer 1, expert 3)"],
        id="missing-expert",
    ),
    pytest.param(
        MOE, lambda d: shutil.rmtree(d / "global_step100"), {}, ["exactly one global_step*/ folder"], id="no-experts"
    ),
    pytest.param(
        MOE,
        lambda d: shutil.copytree(d / "global_step100", d / "global_step200"),
        {},
        ["found ['global_step100', 'global_step200']"],
        id="two-expert-folders",
    ),
    pytest.param(
        MOE,
        lambda d: (d / EXPERTS.format(0, 0)).write_bytes(b"garbage"),
        {},
        ["not a readable weights-only expert pickle"],
        id="expert-garbage",
    ),
    pytest.param(
        MOE, save_expert(lambda tensors: list(tensors.values())), {}, ["holds a list"], id="expert-a-list"
    ),  # fixed: AttributeError
    pytest.param(
        MOE, save_expert(lambda tensors: {"foo": torch.zeros(1)}), {}, ["unexpected tensor 'foo'"], id="expert-key"
    ),
    pytest.param(
        MOE,
        save_expert(lambda tensors: {k: v[:1] for k, v in tensors.items()}),
        {},
        ["do not fit the shapes config.json gives", "experts.0.gate_proj.weight (1, 64)"],
        id="expert-wrong-shape",  # fixed: RuntimeError from load_state_dict
    ),
    pytest.param(DENSE, lambda d: (d / "config.json").unlink(), {}, ["has no config.json"], id="no-config"),
    pytest.param(DENSE, lambda d: (d / "config.json").write_text("{"), {}, ["is not valid JSON"], id="config-not-json"),
    pytest.param(
        DENSE, lambda d: (d / "config.json").write_text("[1]"), {}, ["holds a JSON list"], id="config-a-list"
    ),  # fixed: AttributeError
    pytest.param(DENSE, edit_config(lambda c: c.update(model_type="llava")), {}, ["'llava'", "'pit'"], id="model-type"),
    pytest.param(
        DENSE,
        edit_config(lambda c: c.pop("protein_token_index")),
        {},
        ["lacks 'protein_token_index'"],
        id="no-token-id",
    ),
    pytest.param(
        DENSE,
        edit_config(lambda c: c["text_config"].update(model_type="no-such-model")),
        {},
        ["text_config.model_type='no-such-model'"],
        id="unknown-text-model-type",
    ),
    pytest.param(MOE, edit_config(lambda c: c.update(moe_config={})), {}, ["moe_config lacks"], id="moe-config-empty"),
    pytest.param(
        DENSE, lambda d: (d / "model.safetensors").unlink(), {}, ["has no model.safetensors"], id="no-weights"
    ),
    pytest.param(
        DENSE,
        lambda d: (d / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}"),
        {},
        ["model.safetensors: not a readable safetensors file"],
        id="garbage-weights",
    ),
    pytest.param(
        DENSE, lambda d: shutil.rmtree(d / "protein_tokenizer"), {}, ["lacks ['protein_tokenizer']"], id="no-tokenizer"
    ),
    pytest.param(
        DENSE,
        lambda d: None,
        {"protein_padding_length": 2},
        ["protein_padding_length=2 must be at least 3"],
        id="pad-2",
    ),  # fixed: accepted, max_protein_length became 0
]


@pytest.mark.parametrize(("source", "spoil", "kwargs", "fragments"), CONVERTER_CASES)
def test_converter_rejects(tmp_path, source, spoil, kwargs, fragments):
    folder = tmp_path / "original"
    shutil.copytree(source, folder)
    spoil(folder)
    raises(lambda: converter.convert(folder, tmp_path / "out", **kwargs), fragments)
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- dataset builder and UniProt reader ------------------------------------------------------------------------------


def args(tmp: Path, **kwargs) -> BuildArguments:
    return BuildArguments(output_dir=str(tmp / "dataset"), structures="none", **kwargs)


def unreadable_folder(tmp: Path) -> str:
    folder = tmp / "unreadable"
    write(folder / "garbage.dat", random.Random(0).randbytes(2048))
    write(folder / "garbage.bin", random.Random(1).randbytes(2048))
    write(folder / "notes.txt", b"no UniProt entry here\n")
    return str(folder)


BUILDER_CASES = [
    pytest.param(
        lambda t: args(t, uniprot=[str(t / "missing.dat")]), ["uniprot: ", "missing.dat does not exist"], id="missing"
    ),
    pytest.param(
        lambda t: args(t, split_fractions=[0.5, 0.5]), ["split_fractions", "three numbers"], id="two-fractions"
    ),
    pytest.param(lambda t: args(t, split_fractions=[0.6, 0.3, 0.3]), ["summing to 1"], id="fractions-sum"),
    pytest.param(
        lambda t: args(t, split_fractions=[1.2, -0.1, -0.1]), ["split_fractions", "in [0, 1]"], id="negative-fraction"
    ),  # fixed: failed only after reading every entry, naming no field
    pytest.param(lambda t: args(t, identity_threshold=0.0), ["identity_threshold must be in (0, 1]"], id="identity-0"),
    pytest.param(lambda t: args(t, identity_threshold=1.5), ["identity_threshold", "got 1.5"], id="identity-above-1"),
    pytest.param(lambda t: args(t, workers=0), ["workers must be >= 1"], id="workers-0"),
    pytest.param(lambda t: args(t, max_entries=0), ["max_entries must be >= 1"], id="max-entries-0"),  # fixed: kept 1
    pytest.param(
        lambda t: args(t, clusters_tsv=str(t / "none.tsv")),
        ["clusters_tsv", "none.tsv is not a file"],
        id="no-clusters",
    ),  # fixed: FileNotFoundError after reading every entry
    pytest.param(
        lambda t: BuildArguments(output_dir=str(t / "dataset"), structures=str(t / "nowhere")),
        ["structures", "nowhere is not a folder"],
        id="structures-missing",
    ),
    pytest.param(
        lambda t: args(t, uniprot=[unreadable_folder(t)]),
        ["uniprot: no readable entry", "3 problems reported"],
        id="folder-with-no-readable-entry",
    ),
    pytest.param(
        lambda t: args(t, uniprot=[str(write(t / "empty" / "README.md", b"#").parent)]),
        ["no readable entry", "0 problems"],
        id="empty-folder",
    ),
]


@pytest.mark.parametrize(("make_args", "fragments"), BUILDER_CASES)
def test_dataset_builder_rejects(tmp_path, make_args, fragments):
    raises(lambda: build_dataset(make_args(tmp_path)), fragments)
    assert not (tmp_path / "dataset").exists()


def test_uniprot_reader_rejects_a_missing_path(tmp_path):
    raises(lambda: list(iter_entries(tmp_path / "missing")), ["uniprot: ", "missing does not exist"])  # fixed


# Unreadable files next to a good one: each is reported and skipped, the good entry is still read.
GARBAGE = [
    pytest.param("garbage.dat", lambda: random.Random(3).randbytes(4096), "UnicodeDecodeError", id="binary-flat"),
    pytest.param("garbage.xml", lambda: random.Random(4).randbytes(4096), "", id="binary-xml"),
    pytest.param("garbage.json", lambda: random.Random(5).randbytes(4096), "UnicodeDecodeError", id="binary-json"),
    pytest.param("garbage", lambda: random.Random(6).randbytes(4096), "UnicodeDecodeError", id="binary-no-suffix"),
    pytest.param(
        "cut.dat.gz", lambda: gzip.compress((UNIPROT / "P05067.dat").read_bytes())[:5000], "EOFError", id="gzip-cut"
    ),  # fixed: EOFError ended the build
    pytest.param("fake.dat.gz", lambda: b"ID   not gzip\n", "BadGzipFile", id="gzip-suffix-not-gzip"),
]


@pytest.mark.parametrize(("name", "content", "reason"), GARBAGE)
def test_unreadable_uniprot_files_are_reported_and_skipped(tmp_path, name, content, reason):
    folder = tmp_path / "uniprot"
    shutil.copy(UNIPROT / "P05067.dat", write(folder / name, content()).parent / "P05067.dat")
    report = ReadReport()
    entries = list(iter_entries(folder, report))
    assert [entry.accession for entry in entries] == ["P05067"]
    (problem,) = report.problems
    assert problem.file == str(folder / name) and reason in problem.reason


def test_build_reports_a_binary_uniprot_file_and_builds_the_rest(tmp_path):
    garbage = write(tmp_path / "uniprot" / "garbage.dat", random.Random(7).randbytes(4096))  # fixed: was fatal
    good = [str(UNIPROT / "P05067.dat"), str(UNIPROT / "P00698.json.gz"), str(garbage)]
    result = build_dataset(args(tmp_path, uniprot=good))
    assert sum(examples for examples, _ in result.statistics.split_sizes["captions"].values()) == 2
    (problem,) = result.report.problems
    assert problem.file == str(garbage) and "not UTF-8" in problem.reason


# --- command lines ---------------------------------------------------------------------------------------------------

# What a case that wrongly passes validation would start: replaced so that it fails at once instead of training.
LONG_STEPS = {"evaluate": "evaluate_benchmark", "main_job": "run", "sft": "SepitSFTTrainer"}
LONG_STEPS["stage0"] = "SepitPretrainingTrainer"
LONG_STEPS["lora"] = "SepitSFTTrainer"


@pytest.fixture(scope="module")
def clis() -> dict[str, Callable]:
    mains = {name: runpy.run_path(str(path))["main"] for name, path in SCRIPTS.items()}
    mains |= {
        "build_dataset": build_dataset_module.main,
        "external_benchmarks": external_benchmarks.main,
        "convert": converter.main,
    }
    return mains


@pytest.fixture(scope="module")
def cli_paths(converted, broken_checkpoints, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cli")
    moe = tmp / "moe-missing-expert"
    shutil.copytree(MOE, moe)
    (moe / EXPERTS.format(1, 3)).unlink()
    bad_yaml = write(
        tmp / "unknown-key.yaml", (ROOT / "training/recipes/tiny/stage1.yaml").read_bytes() + b"colour: 1\n"
    )
    return {
        "tmp": str(tmp),
        "model": str(converted),
        "no_weights": str(broken_checkpoints["no-weights"]),
        "moe_missing_expert": str(moe),
        "unreadable": unreadable_folder(tmp),
        "bad_yaml": str(bad_yaml),
        "broken_yaml": str(write(tmp / "broken.yaml", b"output_dir: [unclosed\n")),
        "stage1": str(ROOT / "training/recipes/tiny/stage1.yaml"),
        "lora": str(ROOT / "training/recipes/tiny/lora.yaml"),
    }


TRAIN = ["--output_dir", "{out}", "--bf16", "false", "--use_cpu", "true", "--report_to", "none"]
SFT_NEW = ["--dataset_name", "{tmp}/none", "--protein_model_name_or_path", "p", "--language_model_name_or_path", "l"]
LORA = ["--model_name_or_path", "{model}", "--dataset_name", "{tmp}/none", *TRAIN]

CLI_CASES = [
    # dataset_card.build_dataset
    pytest.param(
        "build_dataset",
        ["--output_dir", "{out}", "--uniprot", "{tmp}/none.dat"],
        ["none.dat does not exist"],
        id="build-missing",
    ),
    pytest.param(
        "build_dataset",
        ["--output_dir", "{out}", "--split_fractions", "0.5", "0.5"],
        ["split_fractions"],
        id="build-split",
    ),
    pytest.param(
        "build_dataset",
        ["--output_dir", "{out}", "--identity_threshold", "0"],
        ["identity_threshold"],
        id="build-identity-0",
    ),
    pytest.param(
        "build_dataset",
        ["--output_dir", "{out}", "--identity_threshold", "half"],
        ["--identity_threshold", "invalid float value: 'half'"],
        id="build-identity-not-a-number",  # fixed: the whole usage text came first
    ),
    pytest.param(
        "build_dataset", ["--output_dir", "{out}", "--clusters_tsv", "{tmp}/none.tsv"], ["clusters_tsv"], id="build-tsv"
    ),
    pytest.param(
        "build_dataset",
        ["--output_dir", "{out}", "--uniprot", "{unreadable}", "--structures", "none"],
        ["no readable entry", "3 problems reported"],
        id="build-no-readable-entry",
    ),
    pytest.param(
        "build_dataset", ["--output_dir", "{out}", "--colour", "red"], ["not used", "--colour"], id="build-unknown-flag"
    ),
    pytest.param("build_dataset", [], ["required", "--output_dir"], id="build-no-output-dir"),
    # dataset_card.external_benchmarks
    pytest.param(
        "external_benchmarks", ["--output_dir", "{out}", "--max_per_benchmark", "1"], ["at least 2"], id="ext-max-1"
    ),
    pytest.param(
        "external_benchmarks",
        ["--output_dir", "{out}", "--uniprot_dir", "{tmp}/none"],
        ["uniprot_dir"],
        id="ext-no-go-names",
    ),  # fixed: silently built no GO questions
    pytest.param("external_benchmarks", ["--max_per_benchmark", "many"], ["invalid int value"], id="ext-not-int"),
    # training/evaluate.py
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--systems", "gpt"],
        ["systems: ['gpt']"],
        id="eval-system",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--max_samples", "0"],
        ["max_samples"],
        id="eval-samples-0",
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--batch_size", "0"],
        ["batch_size"],
        id="eval-batch-0",
    ),  # fixed
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{model}", "--output_dir", "{out}", "--max_new_tokens", "1000000000"],
        ["max_new_tokens must be in [1, 4096]"],
        id="eval-huge-max-new-tokens",  # fixed: went to generate
    ),
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{no_weights}", "--output_dir", "{out}"],
        ["no model weights"],
        id="eval-no-weights",
    ),  # fixed: traceback
    pytest.param(
        "evaluate",
        ["--model_name_or_path", "{tmp}/no/such/model", "--output_dir", "{out}"],
        ["model_name_or_path: {tmp}/no/such/model is not a folder"],
        id="eval-no-model",
    ),  # fixed: traceback
    pytest.param(
        "evaluate",
        [
            "--model_name_or_path",
            "{model}",
            "--output_dir",
            "{out}",
            "--dataset_name",
            "{tmp}/none",
            "--bertscore_model",
            "none",
        ],
        ["none"],
        id="eval-no-dataset",  # fixed: traceback
    ),
    # examples/main_job.py
    pytest.param(
        "main_job", ["--protein_model", "facebook/esm2_t6_8M_UR50D"], ["give all three"], id="job-partial-parts"
    ),
    pytest.param("main_job", ["--recipes", "training"], ["has no stage0.yaml"], id="job-recipes"),
    pytest.param(
        "main_job", ["--output_dir", "{out}", "--max_steps", "0"], ["max_steps must be at least 1"], id="job-steps-0"
    ),  # fixed
    pytest.param(
        "main_job",
        ["--output_dir", "{out}", "--external_per_benchmark", "1"],
        ["external_per_benchmark"],
        id="job-ext-1",
    ),  # fixed: failed in a subprocess after building the dataset
    pytest.param(
        "main_job", ["--dataset_dir", "{tmp}/none"], ["dataset_dir", "is not a folder"], id="job-dataset-dir"
    ),  # fixed
    # modeling_sepit.convert_original_sepit
    pytest.param(
        "convert",
        ["--input_dir", "{moe_missing_expert}", "--output_dir", "{out}"],
        ["layer_1_expert_3"],
        id="convert-expert",
    ),
    pytest.param("convert", ["--output_dir", "{out}"], ["required", "--input_dir"], id="convert-no-input"),
    pytest.param(
        "convert",
        ["--input_dir", str(DENSE), "--output_dir", "{out}", "--protein_padding_length", "wide"],
        ["invalid int value: 'wide'"],
        id="convert-padding-not-int",
    ),
    pytest.param(
        "convert",
        ["--input_dir", str(DENSE), "--output_dir", "{out}", "--protein_padding_length", "1"],
        ["at least 3"],
        id="convert-pad-1",
    ),  # fixed
    pytest.param(
        "convert",
        ["--input_dir", str(DENSE), "--output_dir", "{out}", "--expected_outputs", "{tmp}/none.safetensors"],
        ["expected_outputs", "is not a file"],
        id="convert-no-expected-outputs",  # fixed: FileNotFoundError after converting
    ),
    # training/sft.py
    pytest.param(
        "sft", ["--dataset_name", "d", *TRAIN], ["model_name_or_path: give"], id="sft-no-model"
    ),  # fixed: traceback
    pytest.param(
        "sft", [*SFT_NEW, "--protein_pooling", "0", *TRAIN], ["protein_pooling must be >= 1"], id="sft-pooling-0"
    ),
    pytest.param(
        "sft", [*SFT_NEW, "--max_protein_length", "0", *TRAIN], ["max_protein_length"], id="sft-length-0"
    ),  # fixed
    pytest.param(
        "sft", [*SFT_NEW, "--structure_dropout", "2", *TRAIN], ["structure_dropout"], id="sft-dropout-2"
    ),  # fixed
    pytest.param(
        "sft", [*SFT_NEW, "--freeze", "brain", *TRAIN], ["freeze: unknown modules ['brain']"], id="sft-freeze"
    ),
    pytest.param("sft", ["--config", "{tmp}/none.yaml"], ["none.yaml"], id="sft-config-missing"),  # fixed
    pytest.param("sft", ["--config", "{bad_yaml}", "--output_dir", "{out}"], ["colour"], id="sft-config-unknown-key"),
    pytest.param("sft", ["--config", "{broken_yaml}"], ["broken.yaml"], id="sft-config-not-yaml"),  # fixed
    pytest.param(
        "sft",
        ["--model_name_or_path", "{no_weights}", "--dataset_name", "d", *TRAIN],
        ["no model weights"],
        id="sft-no-weights",
    ),  # fixed: traceback
    pytest.param(
        "sft",
        ["--model_name_or_path", "{model}", "--dataset_name", "{tmp}/none", *TRAIN],
        ["none"],
        id="sft-no-dataset",
    ),
    pytest.param(
        "sft", [*SFT_NEW, "--learning_rate", "fast", *TRAIN], ["invalid float value: 'fast'"], id="sft-lr-not-float"
    ),
    # training/stage0_encoder_warmup.py
    pytest.param(
        "stage0", ["--dataset_name", "d", "--output_dir", "{out}"], ["model_name_or_path: give"], id="stage0-no-model"
    ),
    pytest.param(
        "stage0",
        ["--dataset_name", "d", "--model_name_or_path", "{model}", "--projection_dim", "8", "--output_dir", "{out}"],
        ["['projection_dim']: these build a new model"],
        id="stage0-override-on-continue",
    ),
    pytest.param(
        "stage0",
        [
            "--dataset_name",
            "d",
            "--model_name_or_path",
            "{model}",
            "--max_protein_length",
            "0",
            "--output_dir",
            "{out}",
        ],
        ["max_protein_length"],
        id="stage0-length-0",  # fixed
    ),
    pytest.param(
        "stage0",
        ["--dataset_name", "d", "--model_name_or_path", "{no_weights}", "--output_dir", "{out}"],
        ["no model weights"],
        id="stage0-no-weights",  # fixed: traceback
    ),
    # training/finetune_lora.py
    pytest.param("lora", ["--dataset_name", "d", *TRAIN], ["required", "--model_name_or_path"], id="lora-no-model"),
    pytest.param("lora", [*LORA, "--lora_r", "0"], ["lora_r must be >= 1"], id="lora-rank-0"),  # fixed
    pytest.param("lora", [*LORA, "--structure_dropout", "-1"], ["structure_dropout"], id="lora-dropout"),  # fixed
    pytest.param("lora", [*LORA, "--model_name_or_path", "{no_weights}"], ["no model weights"], id="lora-no-weights"),
    pytest.param(
        "lora",
        [*LORA, "--model_name_or_path", "{tmp}/nowhere"],
        ["model_name_or_path: {tmp}/nowhere"],
        id="lora-no-model-folder",
    ),  # fixed: a Hub repo-id error
    pytest.param("lora", [*LORA, "--config", "{tmp}/none.yaml"], ["none.yaml"], id="lora-config-missing"),  # fixed
]


@pytest.mark.parametrize(("cli", "argv", "fragments"), CLI_CASES)
def test_cli_exits_2_with_one_error_line(clis, cli_paths, tmp_path, capsys, monkeypatch, cli, argv, fragments):
    main = clis[cli]
    paths = {**cli_paths, "out": str(tmp_path / "out")}
    if cli in LONG_STEPS:
        monkeypatch.setitem(main.__globals__, LONG_STEPS[cli], _must_not_run)
    argv = [arg.format(**paths) for arg in argv]
    code = None
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    error = capsys.readouterr().err
    assert code == 2, error[-2000:]
    assert "Traceback" not in error and "usage:" not in error  # not the parser's whole usage text either
    lines = [line for line in error.splitlines() if ": error: " in line]  # progress bars also write to stderr
    assert len(lines) == 1, error[-2000:]
    for fragment in fragments:
        assert fragment.format(**paths) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def _must_not_run(*args, **kwargs):
    raise AssertionError("the arguments passed validation: the command would have started its long run")
