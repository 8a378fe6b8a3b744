"""Malformed values on the model, processor and config side (issue 13, classes 5-7), one table per class: each case
must raise a `ValueError` naming the field and what would be valid (CLIs: exit 2 and one `error:` line), never a
traceback from inside torch/transformers, a silent cast or a silent default. Property tests (hypothesis) feed the
processor proteins of random types and the model random tensors for every input: it runs, or answers such a
`ValueError`, never another exception.

Class 5: silent corruption from odd values (coordinates and masks the processor would cast, weights a checkpoint lacks
or stores as integers, counts given as booleans, training arguments that would silently mean something else).
Class 6: raw tensors reaching torch unchecked (types, dtypes, shapes, values, placeholder runs).
Class 7: configuration values of the wrong type or range (config.json, processor_config.json, keyword arguments).
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_sepit import SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.training_sepit import parameter_groups
from tests.conftest import ORIGINAL, PROTEIN_TOKEN_ID, pad, prompt_ids, protein_batch, run_command_line, tiny_config

Q = "What is <protein> ?"
SEQ = "MKTAYIAK"  # 8 residues
ZEROS8 = np.zeros((8, 3))
PROJECTOR = "model.multi_modal_projector.linear_1"
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "inputs_embeds",
    "labels",
    "protein_input_ids",
    "protein_attention_mask",
    "protein_coords",
    "protein_coords_mask",
    "mm_encoder_outputs",
    "`<protein>`",
)


def raises(call: Callable[[], object], fragments: list[str]) -> str:
    """`call()` raises a ValueError whose message holds every fragment (field name, what would be valid)."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def processor(protein_tokenizer) -> SepitProcessor:
    tokenizer = AutoTokenizer.from_pretrained(ORIGINAL / "original-tiny-dense" / "text_tokenizer")
    return SepitProcessor(tokenizer=tokenizer, protein_tokenizer=protein_tokenizer)


@pytest.fixture(scope="module")
def model() -> SepitForConditionalGeneration:
    torch.manual_seed(0)
    return SepitForConditionalGeneration(tiny_config()).eval()


@pytest.fixture(scope="module")
def batch_of(real_proteins, protein_tokenizer) -> Callable[[], dict]:
    """A fresh valid batch per call: two real proteins with coordinates, each in its own left-padded prompt."""
    proteins = real_proteins[1:]

    def make() -> dict:
        batch = protein_batch(proteins, protein_tokenizer)
        ids, mask = pad(prompt_ids([len(sequence) + 2 for sequence, _ in proteins]), side="left")
        return {**batch, "input_ids": ids, "attention_mask": mask}

    return make


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model saved, and copies with one thing wrong each (weights, config.json, processor_config.json)."""
    root = tmp_path_factory.mktemp("checkpoints")
    model.save_pretrained(root / "ok")
    model.model.save_pretrained(root / "base-only")
    weights = load_file(root / "ok" / "model.safetensors")
    spoiled = {
        "missing-tensor": lambda w: w.pop(f"{PROJECTOR}.weight"),
        "int32-weight": lambda w: w.update({f"{PROJECTOR}.weight": w[f"{PROJECTOR}.weight"].to(torch.int32)}),
        "bool-bias": lambda w: w.update({f"{PROJECTOR}.bias": w[f"{PROJECTOR}.bias"] > 0}),
        "complex-weight": lambda w: w.update({f"{PROJECTOR}.weight": w[f"{PROJECTOR}.weight"].to(torch.complex64)}),
    }
    folders = {"ok": root / "ok", "base-only": root / "base-only"}
    for name, spoil in spoiled.items():
        folders[name] = root / name
        shutil.copytree(root / "ok", folders[name])
        copy = dict(weights)
        spoil(copy)
        save_file(copy, folders[name] / "model.safetensors", metadata={"format": "pt"})
    for name, key, value in (("kernels-str", "num_gaussian_kernels", "16"), ("pooling-float", "protein_pooling", 1.5)):
        folders[name] = root / name
        shutil.copytree(root / "ok", folders[name])
        config = json.loads((folders[name] / "config.json").read_text())
        config[key] = value
        (folders[name] / "config.json").write_text(json.dumps(config))
    return folders


def ask(proteins: object, **kwargs) -> Callable[[SepitProcessor], object]:
    return lambda processor: processor(text=Q, proteins=proteins, **kwargs)


def build(**kwargs) -> Callable[[SepitProcessor], object]:
    return lambda processor: SepitProcessor(processor.tokenizer, processor.protein_tokenizer, **kwargs)


def assigned(name: str, value: object) -> Callable[[SepitProcessor], object]:
    """A setting assigned after construction (as training scripts do), then a call."""

    def call(processor: SepitProcessor) -> object:
        fresh = SepitProcessor(processor.tokenizer, processor.protein_tokenizer)
        setattr(fresh, name, value)
        return fresh(text=Q, proteins=SEQ)

    return call


# --- class 5: silent corruption from odd values ----------------------------------------------------------------------

BOOLEANS = "booleans (True/False, or 0/1)"
REAL = "coords must be numbers (real ints or floats)"

PROCESSOR_CASES = [
    pytest.param(
        ask({"sequence": SEQ, "coords": ZEROS8, "coords_mask": ["False"] * 8}),
        ["proteins[0][0]", "coords_mask must be", BOOLEANS, "<U5"],
        id="coords-mask-strings",  # issue 13's example: bool("False") marked every residue present
    ),
    pytest.param(
        ask({"sequence": SEQ, "coords": ZEROS8 + 1j}), ["proteins[0][0]", REAL, "complex128"], id="complex-coords"
    ),  # issue 13's example: the imaginary part was dropped
    pytest.param(build(max_protein_length=True), ["max_protein_length must be an integer >= 1", "True"], id="len-true"),
    pytest.param(
        ask({"sequence": SEQ, "coords": ZEROS8, "coords_mask": [0.5] * 8}), [BOOLEANS, "0.5"], id="coords-mask-half"
    ),
    pytest.param(ask({"sequence": SEQ, "coords": ZEROS8, "coords_mask": [2] * 8}), [BOOLEANS], id="coords-mask-two"),
    pytest.param(
        ask({"sequence": SEQ, "coords": ZEROS8, "coords_mask": [None] * 8}), [BOOLEANS, "None"], id="coords-mask-none"
    ),
    pytest.param(ask({"sequence": SEQ, "coords": np.ones((8, 3), bool)}), [REAL, "dtype bool"], id="bool-coords"),
    pytest.param(ask({"sequence": SEQ, "coords": [["1.5", "2", "3"]] * 8}), [REAL, "<U3"], id="string-coords"),
    pytest.param(ask({"sequence": SEQ, "coords": [[b"1", b"2", b"3"]] * 8}), [REAL, "|S1"], id="bytes-coords"),
    pytest.param(
        ask({"sequence": SEQ, "coords": [[1.0, 2.0, None]] * 8}),
        [REAL, "got NoneType", "give NaN"],
        id="none-in-coords",
    ),  # was read as NaN: an absent residue
    pytest.param(
        ask({"sequence": SEQ, "coords": np.zeros((8, 3), "datetime64[s]")}), [REAL, "datetime64"], id="date-coords"
    ),
    pytest.param(
        ask({"sequence": SEQ, "coords": np.full((8, 3), 1e300)}), ["exceed float32's range"], id="float32-overflow"
    ),  # became inf: the residues were silently dropped as absent
    pytest.param(build(max_protein_length=2.0), ["max_protein_length must be an integer >= 1"], id="len-float"),
    pytest.param(build(protein_pooling=True), ["protein_pooling must be an integer >= 1"], id="pooling-true"),
    pytest.param(
        build(protein_padding_length="1024"), ["protein_padding_length='1024' must be None or an integer"], id="pad-str"
    ),  # was a TypeError from a comparison
    pytest.param(build(original_compat="false"), ["original_compat must be True or False"], id="compat-str"),
    pytest.param(build(chat_template=5), ["chat_template must be a Jinja template string"], id="template-int"),
    pytest.param(build(chat_template=""), ["chat_template must be a Jinja template string"], id="template-empty"),
    pytest.param(
        assigned("max_protein_length", True), ["max_protein_length must be an integer >= 1"], id="len-assigned-true"
    ),
    pytest.param(assigned("protein_pooling", 0), ["protein_pooling must be an integer >= 1"], id="pooling-assigned-0"),
]


@pytest.mark.parametrize(("call", "fragments"), PROCESSOR_CASES)
def test_processor_refuses_values_it_would_cast(processor, call, fragments):
    raises(lambda: call(processor), fragments)


def test_processor_still_takes_numbers_it_reads_exactly(processor):
    """Integer coordinates, 0/1 masks and torch tensors are read as they are: nothing is lost, nothing refused."""
    out = processor(
        text=Q, proteins={"sequence": SEQ, "coords": np.arange(24).reshape(8, 3), "coords_mask": [1, 0] * 4}
    )
    assert out["protein_coords_mask"][0, 1:9].tolist() == [True, False] * 4
    assert out["protein_coords"][0, 1].tolist() == [0.0, 1.0, 2.0]
    out = processor(text=Q, proteins={"sequence": SEQ, "coords": torch.ones(8, 3), "coords_mask": torch.ones(8) > 0})
    assert bool(out["protein_coords_mask"][0, 1:9].all())


def load(folder: str, **kwargs) -> Callable[[dict], object]:
    return lambda folders: SepitForConditionalGeneration.from_pretrained(folders[folder], **kwargs)


LOAD_CASES = [
    pytest.param(
        load("int32-weight"), [f"{PROJECTOR}.weight (I32)", "cast silently", "save them as floats"], id="int32-weight"
    ),  # issue 13's example
    pytest.param(
        load("missing-tensor"), ["lacks 1 weights", f"{PROJECTOR}.weight", "would be random"], id="missing-tensor"
    ),  # issue 13's example: only a log line said so
    pytest.param(load("bool-bias"), [f"{PROJECTOR}.bias (BOOL)"], id="bool-bias"),
    pytest.param(load("complex-weight"), [f"{PROJECTOR}.weight (C64)"], id="complex-weight"),
    pytest.param(load("base-only"), ["lacks 1 weights", "lm_head.weight"], id="base-model-into-head"),
    pytest.param(load("missing-tensor", dtype=torch.bfloat16), [f"{PROJECTOR}.weight"], id="missing-with-dtype"),
]


@pytest.mark.parametrize(("call", "fragments"), LOAD_CASES)
def test_loading_refuses_weights_it_would_invent_or_cast(folders, call, fragments):
    raises(lambda: call(folders), fragments)


def test_missing_weights_are_listed_when_the_caller_asks(folders):
    """`output_loading_info=True` is transformers' way to inspect what a checkpoint lacks: the list, no refusal."""
    _, info = SepitForConditionalGeneration.from_pretrained(folders["missing-tensor"], output_loading_info=True)
    assert info["missing_keys"] == {f"{PROJECTOR}.weight"}
    assert not SepitForConditionalGeneration.from_pretrained(folders["ok"], output_loading_info=True)[1]["missing_keys"]


def generate(**kwargs) -> Callable[[SepitForConditionalGeneration, dict], object]:
    return lambda model, batch: model.generate(**batch, do_sample=False, **kwargs)


GENERATE_CASES = [
    pytest.param(generate(max_new_tokens=True), ["max_new_tokens must be an integer", "True"], id="max-new-true"),
    pytest.param(generate(max_new_tokens=2.5), ["max_new_tokens must be an integer", "2.5"], id="max-new-float"),
    pytest.param(generate(min_new_tokens=True), ["min_new_tokens must be an integer"], id="min-new-true"),
    pytest.param(generate(max_length=False), ["max_length must be an integer"], id="max-length-false"),
    pytest.param(
        generate(generation_config=GenerationConfig(max_new_tokens=True)),
        ["max_new_tokens must be an integer"],
        id="config-max-new-true",
    ),
]


@pytest.mark.parametrize(("call", "fragments"), GENERATE_CASES)
def test_generate_refuses_counts_that_are_not_integers(model, batch_of, call, fragments):
    raises(lambda: call(model, batch_of()), fragments)


SFT = ["training/sft.py", "--dataset_name", "none", "--protein_model_name_or_path", "p"]
SFT += ["--language_model_name_or_path", "l", "--output_dir", "{out}", "--report_to", "none", "--use_cpu", "true"]
SFT += ["--bf16", "false"]

SFT_CASES = [
    pytest.param(
        ["--num_experts", "0"], ["num_experts must be >= 1", "dense model"], id="zero-experts"
    ),  # trained dense
    pytest.param(["--encoder_lr_scale", "-0.1"], ["encoder_lr_scale must be a finite number >= 0"], id="neg-scale"),
    pytest.param(["--num_experts", "-2"], ["num_experts must be >= 1"], id="negative-experts"),
    pytest.param(["--language_model_lr_scale", "nan"], ["language_model_lr_scale", "finite"], id="nan-scale"),
    pytest.param(["--language_model_lr_scale", "-1"], ["language_model_lr_scale", ">= 0"], id="neg-llm-scale"),
    pytest.param(["--num_experts_per_tok", "2"], ["num_experts_per_tok=2 needs num_experts"], id="top-k-dense"),
    pytest.param(["--num_experts", "2", "--num_experts_per_tok", "3"], ["[1, num_experts=2]"], id="top-k-above"),
    pytest.param(
        ["--router_aux_loss_coef", "-0.01"], ["router_aux_loss_coef must be a finite number >= 0"], id="neg-aux"
    ),
    pytest.param(["--router_aux_loss_coef", "inf"], ["router_aux_loss_coef", "finite"], id="inf-aux"),
]


STAGE0 = ["training/stage0_encoder_warmup.py", "--dataset_name", "none", "--protein_model_name_or_path", "p"]
STAGE0 += ["--text_encoder_name_or_path", "t", "--output_dir", "{out}", "--report_to", "none"]
SFT_CASES += [
    pytest.param(
        [*STAGE0, "--new_modules_lr_scale", "-1"], ["new_modules_lr_scale must be a finite number >= 0"], id="stage0"
    )
]


@pytest.mark.parametrize(("argv", "fragments"), SFT_CASES)
def test_trainers_refuse_arguments_that_would_train_something_else(tmp_path, argv, fragments):
    argv = argv if argv[0].endswith(".py") else SFT + argv
    code, _, err = run_command_line([arg.format(out=tmp_path / "out") for arg in argv])
    lines = err.strip().splitlines()
    script = argv[0].removeprefix("training/").removesuffix(".py")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("scale", [-0.5, float("inf"), "0.1", True])
def test_parameter_groups_refuse_a_scale_that_is_not_a_fraction(model, scale):
    raises(lambda: parameter_groups(model, 1e-4, 0.0, [], encoder_lr_scale=scale), ["encoder_lr_scale", ">= 0"])


# --- class 6: raw tensors reaching torch unchecked -------------------------------------------------------------------


def set_value(name: str, index: tuple, value: object) -> Callable[[dict], None]:
    def edit(batch: dict) -> None:
        batch[name] = batch[name].clone()
        batch[name][index] = value

    return edit


def replace(**changes: Callable[[dict], object]) -> Callable[[dict], None]:
    def edit(batch: dict) -> None:
        for name, change in changes.items():
            batch[name] = change(batch)

    return edit


def swap_rows(batch: dict) -> None:
    """Each protein's placeholder run in the other protein's question: runs of 28 and 53 for proteins of 53 and 28."""
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"].flip(0), batch["attention_mask"].flip(0)


def split_first_run(batch: dict) -> None:
    """A text token inside protein 0's run: the count still matches, the run no longer ends where the protein does."""
    row = batch["input_ids"][0]
    start = int((row == PROTEIN_TOKEN_ID).nonzero()[0])
    row[start + 10], row[start - 1] = 5, PROTEIN_TOKEN_ID


def empty(*names: str, rows: slice = slice(0, 0), columns: slice = slice(None)) -> Callable[[dict], None]:
    return replace(**{name: lambda b, name=name: b[name][rows, columns] for name in names})


PROTEINS = ("protein_input_ids", "protein_attention_mask", "protein_coords", "protein_coords_mask")
MASK01 = "it must hold only 0 (padding) and 1"

FORWARD_CASES = [
    pytest.param(
        set_value("protein_attention_mask", (0, 0), 2), ["protein_attention_mask holds 2 at protein 0", MASK01]
    ),  # issue 13's example: failed inside masked_scatter
    pytest.param(
        lambda b: (
            set_value("protein_attention_mask", (0, 0), 2)(b),
            set_value("protein_attention_mask", (0, 1), 0)(b),
        ),
        ["protein_attention_mask holds 2", MASK01],
        id="mask-2-same-count",
    ),
    pytest.param(swap_rows, ["`input_ids` row 0", "does not end where a protein's tokens end"], id="runs-wrong-rows"),
    pytest.param(split_first_run, ["`input_ids` row 0", "must be one run"], id="run-split"),
    pytest.param(
        replace(attention_mask=lambda b: b["attention_mask"][:, 1:]),
        ["attention_mask has shape (2, 57)", "(2, 0 + 58)"],
        id="attention-mask-one-column-short",
    ),
    pytest.param(set_value("input_ids", (0, -1), 1000), ["input_ids holds 1000", "[0, 100)"], id="id-out-of-vocab"),
    pytest.param(set_value("input_ids", (1, -1), -5), ["input_ids holds -5", "[0, 100)"], id="id-negative"),
    pytest.param(
        replace(input_ids=lambda b: b["input_ids"].float()), ["input_ids has dtype torch.float32"], id="f-ids"
    ),
    pytest.param(replace(input_ids=lambda b: b["input_ids"].numpy()), ["input_ids: got ndarray"], id="numpy-ids"),
    pytest.param(replace(input_ids=lambda b: b["input_ids"].tolist()), ["input_ids: got list"], id="list-ids"),
    pytest.param(
        replace(protein_coords=lambda b: b["protein_coords"].numpy()),
        ["protein_coords: got ndarray"],
        id="numpy-coords",
    ),
    pytest.param(
        replace(labels=lambda b: torch.cat([b["input_ids"]] * 2, 1)),
        ["labels has shape (2, 116)", "input_ids' shape (2, 58)"],
        id="labels-longer",
    ),
    pytest.param(replace(labels=lambda b: b["input_ids"].float()), ["labels has dtype torch.float32"], id="labels-f"),
    pytest.param(replace(labels=lambda b: b["input_ids"].int()), ["labels has dtype torch.int32"], id="labels-int32"),
    pytest.param(replace(labels=lambda b: b["input_ids"] + 100), ["labels holds", "or -100"], id="labels-vocab"),
    pytest.param(empty(*PROTEINS), ["protein_input_ids has shape (0, 53)", "leave the protein inputs out"], id="none"),
    pytest.param(empty(*PROTEINS, rows=slice(None), columns=slice(0, 0)), ["shape (2, 0)"], id="zero-width-proteins"),
    pytest.param(set_value("protein_input_ids", (0, 1), 50), ["protein_input_ids holds 50", "[0, 33)"], id="esm-vocab"),
    pytest.param(
        replace(protein_input_ids=lambda b: b["protein_input_ids"].float()),
        ["protein_input_ids has dtype torch.float32", "integers (torch.long"],
        id="float-protein-ids",
    ),
    pytest.param(
        replace(protein_attention_mask=lambda b: b["protein_attention_mask"] * 0.5), ["holds 0.5", MASK01], id="half"
    ),
    pytest.param(set_value("protein_attention_mask", (1, slice(None)), 0), ["is 0 everywhere for protein 1"], id="0s"),
    pytest.param(
        replace(protein_coords=lambda b: b["protein_coords"].to(torch.complex64)),
        ["protein_coords has dtype torch.complex64", "real numbers"],
        id="complex-coords",
    ),
    pytest.param(
        replace(protein_coords_mask=lambda b: b["protein_coords_mask"].float() * 0.3),
        ["protein_coords_mask holds 0.3", "True/False"],
        id="coords-mask-fraction",
    ),
    pytest.param(set_value("attention_mask", (0, -1), 2), ["attention_mask holds 2", "only 0 (padding) and 1"]),
    pytest.param(
        replace(input_ids=lambda b: b["input_ids"][0], attention_mask=lambda b: b["attention_mask"][0]),
        ["input_ids has shape (58,)", "(batch, sequence)"],
        id="input-ids-1d",
    ),
    pytest.param(
        replace(position_ids=lambda b: torch.arange(3)[None]),
        ["position_ids has shape (1, 3)", "(2, 58)"],
        id="position-ids-short",
    ),
    pytest.param(
        replace(attention_mask=lambda b: torch.ones(2, 1, 58, 57)),
        ["attention_mask is 4-D", "(2, 1, 58, >= 58)"],
        id="4d",
    ),
    pytest.param(
        replace(attention_mask=lambda b: torch.ones(2, 1, 58, 58, dtype=torch.long)),
        ["attention_mask is 4-D with dtype torch.int64", "bool"],
        id="4d-int",
    ),
]


@pytest.mark.parametrize(("edit", "fragments"), FORWARD_CASES)
def test_forward_refuses_tensors_torch_would_fail_on_or_misread(model, batch_of, edit, fragments):
    batch = batch_of()
    edit(batch)
    raises(lambda: model(**batch), fragments)


def embeds_instead(model: SepitForConditionalGeneration, batch: dict, change: Callable) -> dict:
    embeds = model.get_input_embeddings()(batch.pop("input_ids")).detach()
    return {**batch, "inputs_embeds": change(embeds)}


def precomputed(model: SepitForConditionalGeneration, batch: dict, change: Callable) -> dict:
    proteins = {name: batch.pop(name) for name in PROTEINS}
    features = model.get_protein_features(**proteins, return_dict=True)
    return {**batch, "mm_encoder_outputs": change(features)}


OTHER_FORWARD_CASES = [
    pytest.param(
        lambda m, b: embeds_instead(m, b, lambda e: e.long()), ["inputs_embeds has dtype torch.int64"], id="int-embeds"
    ),
    pytest.param(
        lambda m, b: embeds_instead(m, b, lambda e: e[..., :31]), ["inputs_embeds has width 31", "hidden size 32"]
    ),
    pytest.param(
        lambda m, b: precomputed(
            m,
            b,
            lambda f: {"protein": BaseModelOutputWithPooling(pooler_output=tuple(p[:, :31] for p in f.pooler_output))},
        ),
        ["mm_encoder_outputs['protein'].pooler_output has width 31", "hidden size 32"],
        id="precomputed-width",
    ),
    pytest.param(
        lambda m, b: precomputed(m, b, lambda f: [f]), ["mm_encoder_outputs: got list", "{'protein'"], id="not-a-dict"
    ),
    pytest.param(
        lambda m, b: precomputed(m, b, lambda f: f),
        ["mm_encoder_outputs: got BaseModelOutputWithPooling ['pooler_output']", "{'protein'"],
        id="features-without-their-key",
    ),
    pytest.param(
        lambda m, b: precomputed(
            m, b, lambda f: {"protein": BaseModelOutputWithPooling(pooler_output=f.pooler_output[::-1])}
        ),
        ["`input_ids` row 0", "does not end where a protein's tokens end"],
        id="precomputed-in-wrong-order",
    ),
]


@pytest.mark.parametrize(("make", "fragments"), OTHER_FORWARD_CASES)
def test_forward_refuses_malformed_embeddings_and_precomputed_features(model, batch_of, make, fragments):
    with torch.no_grad():
        batch = make(model, batch_of())
    raises(lambda: model(**batch), fragments)


def test_generate_refuses_numpy_inputs(model, batch_of):
    batch = {name: value.numpy() for name, value in batch_of().items()}
    raises(lambda: model.generate(**batch, max_new_tokens=2), ["got ndarray, not a torch tensor", "return_tensors"])


def test_the_checks_leave_valid_inputs_alone(model, batch_of):
    """Valid variants (bool and float 0/1 masks, int32 ids, float64 and integer coordinates, position ids, labels
    with -100) still run, and give the very logits of the plain batch where they mean the same."""
    batch = batch_of()
    with torch.no_grad():
        reference = model(**batch).logits
        for change in (
            {"attention_mask": batch["attention_mask"].bool()},
            {"attention_mask": batch["attention_mask"].float()},
            {"input_ids": batch["input_ids"].int(), "protein_input_ids": batch["protein_input_ids"].int()},
            {"protein_coords": batch["protein_coords"].double()},
            {"protein_coords_mask": batch["protein_coords_mask"].long()},
            {"labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)},
        ):
            torch.testing.assert_close(model(**{**batch, **change}).logits, reference)


# --- class 7: configuration values of the wrong type -----------------------------------------------------------------


def text_config(**changes) -> dict:
    base = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {**base, "intermediate_size": 48, "vocab_size": 100, "pad_token_id": 0, "bos_token_id": 1, **changes}


CONFIG_CASES = [
    pytest.param(
        lambda f: tiny_config(num_gaussian_kernels="128"), ["num_gaussian_kernels='128' has type str", "must be int"]
    ),  # issue 13's examples: TypeErrors (StrictDataclassFieldValidationError, not a ValueError)
    pytest.param(lambda f: tiny_config(protein_pooling=1.5), ["protein_pooling=1.5 has type float", "must be int"]),
    pytest.param(
        lambda f: tiny_config(protein_config=[1, 2]),
        ["protein_config=[1, 2] has type list", "dict or PreTrainedConfig"],
    ),
    pytest.param(
        lambda f: SepitForConditionalGeneration(tiny_config(protein_token_id=100)),
        ["protein_token_id=100 is outside the LLM vocabulary", "vocab_size=100"],
        id="token-outside-vocab",  # was the misleading `<protein>`-count message
    ),
    pytest.param(
        lambda f: tiny_config(protein_token_id=2), ["protein_token_id=2 is the LLM's text_config.eos_token_id"]
    ),
    pytest.param(lambda f: tiny_config(protein_token_id=0), ["text_config.pad_token_id"], id="token-is-pad"),
    pytest.param(lambda f: tiny_config(protein_token_id=1), ["text_config.bos_token_id"], id="token-is-bos"),
    pytest.param(lambda f: tiny_config(protein_token_id=-1), ["protein_token_id must be a token id >= 0"]),
    pytest.param(lambda f: tiny_config(protein_token_id="99"), ["protein_token_id='99' has type str", "must be int"]),
    pytest.param(lambda f: tiny_config(protein_token_id=None), ["protein_token_id=None", "must be int"]),
    pytest.param(
        lambda f: tiny_config(text_config=text_config(eos_token_id=[2, PROTEIN_TOKEN_ID])),
        [f"protein_token_id={PROTEIN_TOKEN_ID} is the LLM's text_config.eos_token_id"],
        id="token-in-eos-list",
    ),
    pytest.param(
        lambda f: tiny_config(text_config=text_config(vocab_size="100")),
        ["text_config.vocab_size='100' has type str", "must be int"],
        id="text-config-field-str",
    ),
    pytest.param(lambda f: tiny_config(text_config=5), ["text_config=5 has type int"], id="text-config-int"),
    pytest.param(lambda f: tiny_config(original_compat="false"), ["original_compat='false'", "must be bool"]),
    pytest.param(lambda f: tiny_config(num_experts="4"), ["num_experts='4' has type str", "int or None"]),
    pytest.param(lambda f: tiny_config(structure_chunk_size=4.5), ["structure_chunk_size=4.5", "must be int"]),
    pytest.param(lambda f: tiny_config(projector_hidden_act=None), ["projector_hidden_act=None", "must be str"]),
    pytest.param(
        lambda f: tiny_config(structure_embedding_scale=float("nan")), ["structure_embedding_scale must be a finite"]
    ),
    pytest.param(lambda f: tiny_config(router_aux_loss_coef=-1.0), ["router_aux_loss_coef must be a finite number"]),
    pytest.param(
        lambda f: SepitForConditionalGeneration.from_pretrained(f["kernels-str"]),
        ["num_gaussian_kernels='16' has type str"],
        id="config-json-kernels-str",
    ),
    pytest.param(
        lambda f: SepitForConditionalGeneration.from_pretrained(f["pooling-float"]),
        ["protein_pooling=1.5 has type float"],
        id="config-json-pooling-float",
    ),
]


@pytest.mark.parametrize(("call", "fragments"), CONFIG_CASES)
def test_config_refuses_values_of_the_wrong_type_or_range(folders, call, fragments):
    raises(lambda: call(folders), fragments)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_protein_length", "1022", "max_protein_length must be an integer >= 1"),
        ("protein_pooling", 1.0, "protein_pooling must be an integer >= 1"),
        ("original_compat", "no", "original_compat must be True or False"),
        ("protein_padding_length", 12.5, "protein_padding_length=12.5 must be None or an integer"),
    ],
)
def test_processor_config_json_with_a_value_of_the_wrong_type(processor, tmp_path, key, value, fragment):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config[key] = value
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    raises(lambda: SepitProcessor.from_pretrained(tmp_path), [fragment])


# --- property tests --------------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(max_magnitude=1e6),
    st.text(max_size=12),
    st.binary(max_size=6),
)
DTYPES = ["bool", "int8", "uint8", "int64", "float16", "float32", "float64", "complex64", "U3", "S2", "O", "M8[s]"]


@st.composite
def arrays(draw, length: int):
    """Numpy arrays of any of many dtypes, mostly of a shape that fits `length` residues."""
    shape = draw(st.sampled_from([(length, 3), (length,), (length, 2), (length + 1, 3), (0,), ()]))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if dtype.kind == "O":
        items = draw(st.lists(scalars, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))) or [None]
        # dtype=object: numpy would otherwise guess a string dtype for mixed str/bytes items and fail to decode them.
        return np.array(items, dtype=object)
    return draw(hnp.arrays(dtype, shape))


@st.composite
def odd_proteins(draw):
    """A protein of a random type: strings (sequences, paths), numbers, bytes, lists, tuples, tensors, or a dict with
    known and unknown keys holding values of random types."""
    sequence = draw(st.one_of(st.text(alphabet="ACDEFGHIKLMNPQRSTVWYX", min_size=1, max_size=12), st.text(max_size=8)))
    length = max(len(sequence), 1)
    value = st.one_of(scalars, arrays(length), st.lists(scalars, max_size=4), st.just(sequence))
    kind = draw(st.sampled_from(["dict", "dict", "dict", "scalar", "list", "tuple", "tensor", "sequence"]))
    if kind == "scalar":
        return draw(scalars)
    if kind == "list":
        return draw(st.lists(value, max_size=3))
    if kind == "tuple":
        return (draw(value), draw(value))
    if kind == "tensor":
        return torch.from_numpy(np.random.default_rng(draw(st.integers(0, 99))).normal(size=(length, 3)))
    if kind == "sequence":
        return sequence
    keys = draw(st.sets(st.sampled_from(["sequence", "coords", "coords_mask", "plddt", "chain", "structure", "x"])))
    protein = {key: draw(value) for key in keys}
    if draw(st.booleans()):
        protein["sequence"] = sequence
    return protein


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(protein=odd_proteins())
@example(protein={"structure": "\x00"})  # os.stat raises ValueError("embedded null byte"), found by CI
@example(protein={"structure": "a\x00b.pdb", "chain": "A"})
@example(protein="\ud800/x.pdb")  # a lone surrogate: os.stat raises UnicodeEncodeError
def test_processor_on_proteins_of_random_types_runs_or_names_the_field(processor, protein):
    try:
        out = processor(text=Q, proteins=[protein])
    except ValueError as error:
        # A list is read as the text's group of proteins (`text[0]: 1 tag but n proteins`); files name their path.
        assert any(name in str(error) for name in ("proteins[0][0]", "text[0]", "structure", "PDB/mmCIF")), str(error)
        return
    assert bool(torch.isfinite(out.get("protein_coords", torch.zeros(1))).all())


# Sizes within reach of memory: protein_padding_length=2**40 would pad every protein to 2**40 positions.
settings_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3000),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    settings_=st.dictionaries(
        st.sampled_from(["max_protein_length", "protein_pooling", "protein_padding_length", "original_compat"]),
        settings_values,
    )
)
def test_processor_settings_of_random_types_construct_or_name_the_setting(processor, settings_):
    try:
        built = SepitProcessor(processor.tokenizer, processor.protein_tokenizer, **settings_)
    except ValueError as error:
        assert any(name in str(error) for name in settings_), str(error)
        return
    built(text=Q, proteins=SEQ)


TENSOR_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
]


@st.composite
def precomputed_features(draw) -> object:
    """`mm_encoder_outputs` of random form: the dict of per-protein features (random counts, widths, dtypes), or not."""
    pieces = [
        torch.zeros(
            draw(st.integers(0, 60)), draw(st.sampled_from([32, 32, 31])), dtype=draw(st.sampled_from(TENSOR_DTYPES))
        )
        for _ in range(draw(st.integers(1, 3)))
    ]
    output = BaseModelOutputWithPooling(pooler_output=tuple(pieces) if draw(st.booleans()) else pieces[0])
    return draw(st.sampled_from([{"protein": output}, [output], {"protein": None}, output]))


@st.composite
def spoiled_batch(draw, valid: dict):
    """A valid batch with some inputs replaced: by tensors of random dtype, shape (the valid one, perturbed, or any)
    and values (within and beyond the valid ranges, NaN, inf), or by non-tensors; `inputs_embeds` may replace
    `input_ids`, precomputed features the protein tensors."""
    batch = {name: tensor.clone() for name, tensor in valid.items()}
    length = tuple(valid["input_ids"].shape)
    extra = {"labels": (length, torch.long), "position_ids": (length, torch.long)}
    extra["inputs_embeds"] = ((*length, 32), torch.float32)
    names = draw(st.sets(st.sampled_from([*valid, *extra, "mm_encoder_outputs"]), min_size=1, max_size=3))
    for name in names:
        if name == "mm_encoder_outputs":
            batch[name] = draw(precomputed_features())
            if draw(st.booleans()):
                for protein_input in PROTEINS:
                    batch.pop(protein_input)
            continue
        if name == "inputs_embeds" and draw(st.booleans()):
            batch.pop("input_ids")
        shape, valid_dtype = (tuple(valid[name].shape), valid[name].dtype) if name in valid else extra[name]
        kind = draw(st.sampled_from(["tensor"] * 3 + ["values"] * 3 + ["numpy", "list", "none", "scalar"]))
        if kind == "none":
            batch[name] = None
            continue
        if kind == "scalar":
            batch[name] = draw(st.one_of(st.integers(-5, 200), st.floats(), st.text(max_size=3)))
            continue
        if kind == "values" and name in batch:  # right shape and dtype, some values replaced (if not popped above)
            tensor = batch[name]
            flat = tensor.view(-1)
            for index in draw(st.lists(st.integers(0, max(flat.numel() - 1, 0)), min_size=1, max_size=4)):
                pick = draw(
                    st.sampled_from([-100, -1, 0, 1, 2, 32, 33, 99, 100, 10**6, 0.5, float("nan"), float("inf")])
                )
                if flat.numel() and (tensor.dtype.is_floating_point or float(pick).is_integer()):
                    flat[index] = int(pick) if tensor.dtype is torch.bool else pick
            continue
        how = draw(st.sampled_from(["same", "perturbed", "any"]))
        dims = shape
        if how == "perturbed":
            axis, delta = draw(st.integers(0, len(shape) - 1)), draw(st.sampled_from([-2, -1, 1, 2]))
            dims = tuple(max(n + delta, 0) if i == axis else n for i, n in enumerate(shape))
        elif how == "any":
            dims = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        dtype = draw(st.one_of(st.just(valid_dtype), st.sampled_from(TENSOR_DTYPES)))
        low, high = draw(st.sampled_from([(0, 2), (0, 100), (-5, 200), (0, 33)]))
        tensor = torch.randint(low, high, dims).to(dtype)
        if dtype.is_floating_point and draw(st.booleans()):
            tensor = (tensor + torch.rand(dims)).to(dtype)
        batch[name] = tensor.numpy() if kind == "numpy" and dtype is not torch.bfloat16 else tensor
        if kind == "list":
            batch[name] = tensor.tolist()
    return {name: value for name, value in batch.items() if value is not None}


@pytest.fixture(scope="module")
def valid_batch(batch_of) -> dict:
    return batch_of()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_model_on_random_tensors_runs_or_names_the_field(model, valid_batch, data):
    batch = data.draw(spoiled_batch(valid_batch))
    try:
        with torch.no_grad():
            model(**batch)
    except ValueError as error:
        assert any(name in str(error) for name in MODEL_INPUTS), str(error)
