"""Convert a checkpoint in the original SEPIT release layout (`model_type: "pit"`, DeepSpeed expert pickles) into a
SEPIT-HF folder that `SepitForConditionalGeneration.from_pretrained` loads.

    python -m modeling_sepit.convert_original_sepit --input_dir ORIGINAL --output_dir CONVERTED

The converted model runs in `original_compat` mode, which reproduces the release's outputs (see `SepitConfig`).
"""

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, EsmConfig

from .atomic_folder import atomic_folder
from .cli_sepit import script_parser
from .configuration_sepit import SepitConfig
from .modeling_sepit import SepitForConditionalGeneration, unused_protein_weights
from .processing_sepit import SepitProcessor

EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
EXPERT_KEY = re.compile(
    r"text_model\.model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+_proj)\.weight"
)
# Original key (regex) -> SEPIT-HF key; the first match wins. None drops the key.
KEY_RENAMES = (
    (r"protein_model\.structure_bias\.gbf\.(means|stds)", r"model.structure_module.gaussian_kernels.\1"),
    (r"protein_model\.structure_bias\.gbf_proj\.layer1\.", "model.structure_module.kernel_proj_in."),
    (r"protein_model\.structure_bias\.gbf_proj\.layer2\.", "model.structure_module.kernel_proj_out."),
    (r"protein_model\.structure_bias\.edge_proj\.", "model.structure_module.embedding_proj."),
    (
        r"protein_model\.encoder\.layer\.0\.attention\.self\.rotary_embeddings\.inv_freq",
        "model.protein_model.rotary_embeddings.inv_freq",
    ),
    (r"protein_model\.encoder\.layer\.\d+\.attention\.self\.rotary_embeddings\.inv_freq", None),
    (r"protein_model\.pooler\.", None),
    (r"protein_model\.", "model.protein_model."),
    (r"multi_modal_projector\.", "model.multi_modal_projector."),
    (r"text_model\.model\.layers\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.", r"model.language_model.layers.\1.mlp.gate."),
    (r"text_model\.model\.", "model.language_model."),
    (r"text_model\.lm_head\.", "lm_head."),
)


@dataclass
class ConversionArguments:
    input_dir: str = field(
        metadata={"help": "Folder in the original release layout (config.json with model_type 'pit')."}
    )
    output_dir: str = field(
        metadata={"help": "SEPIT-HF folder to write (replaced atomically; new, empty, or an earlier conversion)."}
    )
    protein_padding_length: int = field(
        default=1024, metadata={"help": "Positions the release padded every protein to (1024; the fixtures use 48)."}
    )
    expected_outputs: str | None = field(
        default=None,
        metadata={
            "help": "expected_outputs.safetensors computed by the original code: check the conversion against it."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir even if it holds other files."})

    def __post_init__(self) -> None:
        if self.expected_outputs and not Path(self.expected_outputs).is_file():
            raise ValueError(
                f"expected_outputs: {self.expected_outputs} is not a file; give expected_outputs.safetensors"
            )


def read_original_config(input_dir: Path) -> dict:
    config_path = input_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"input_dir: {input_dir} has no config.json; expected an original SEPIT release folder")
    try:
        original = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"input_dir: {config_path} is not valid JSON ({error})") from error
    if not isinstance(original, dict):
        raise ValueError(f"input_dir: {config_path} holds a JSON {type(original).__name__}; expected an object")
    if original.get("model_type") != "pit":
        raise ValueError(
            f"input_dir: {config_path} has model_type {original.get('model_type')!r}; the original release uses 'pit'"
        )
    for key in ("protein_config", "text_config", "protein_token_index"):
        if key not in original:
            raise ValueError(f"input_dir: {config_path} lacks {key!r}, which every original release config has")
    return original


def sepit_config_from_original(original: dict, num_kernels: int) -> SepitConfig:
    """The SEPIT-HF config that reproduces the original model (`original_compat`, no embedding term)."""
    strategy = original.get("protein_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(f"protein_feature_select_strategy {strategy!r} is not supported; the release uses 'full'")
    text_config = dict(original["text_config"])
    # Pad is eos in the release; the text config itself leaves it unset.
    text_config["pad_token_id"] = original.get("pad_token_id", original.get("eos_token_id"))
    moe = {}
    if original.get("use_moe"):
        moe_config = original.get("moe_config") or {}
        if "num_experts" not in moe_config or "k" not in moe_config:
            raise ValueError("config.json: use_moe is true but moe_config lacks num_experts or k")
        moe = {
            "num_experts": moe_config["num_experts"],
            "num_experts_per_tok": moe_config["k"],
            "router_aux_loss_coef": moe_config.get("router_aux_loss_coef", 0.01),
            "norm_topk_prob": False,
        }
    return SepitConfig(
        protein_config=EsmConfig.from_dict(original["protein_config"]),
        text_config=text_config,
        protein_token_id=original["protein_token_index"],
        protein_feature_layer=original.get("protein_feature_layer", -2),
        projector_hidden_act=original.get("projector_hidden_act", "gelu"),
        num_gaussian_kernels=num_kernels,
        structure_embedding_scale=0.0,
        original_compat=True,
        **moe,
    )


def rename_key(key: str) -> str | None:
    for pattern, replacement in KEY_RENAMES:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key, count=1)
    raise ValueError(f"model.safetensors: unexpected tensor {key!r} in an original SEPIT checkpoint")


def read_original_weights(input_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` under SEPIT-HF names (experts live elsewhere)."""
    weights_path = input_dir / "model.safetensors"
    if not weights_path.is_file():
        raise ValueError(f"input_dir: {input_dir} has no model.safetensors")
    state_dict = {}
    try:
        with safe_open(weights_path, framework="pt") as weights:
            for key in weights.keys():
                new_key = rename_key(key)
                if new_key is not None:
                    state_dict[new_key] = weights.get_tensor(key)
    except SafetensorError as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from error
    for name in ("means", "stds"):
        key = f"model.structure_module.gaussian_kernels.{name}"
        if key in state_dict:
            state_dict[key] = state_dict[key].reshape(-1)
    return state_dict


def read_experts(input_dir: Path, config: SepitConfig) -> dict[str, torch.Tensor]:
    """Expert weights from the DeepSpeed `global_step*/` pickles, read with `weights_only=True`."""
    step_dirs = sorted(p for p in input_dir.glob("global_*") if p.is_dir())
    if len(step_dirs) != 1:
        raise ValueError(
            f"input_dir: an MoE checkpoint needs exactly one global_step*/ folder of expert weights, found "
            f"{[p.name for p in step_dirs]}"
        )
    experts = {}
    for layer in range(config.text_config.num_hidden_layers):
        for expert in range(config.num_experts):
            path = step_dirs[0] / EXPERT_FILE.format(layer=layer, expert=expert)
            if not path.is_file():
                raise ValueError(
                    f"{step_dirs[0].name}: missing expert file {path.name} (layer {layer}, expert {expert})"
                )
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"{path}: not a readable weights-only expert pickle ({error})") from error
            if not isinstance(tensors, dict):
                raise ValueError(f"{path.name}: holds a {type(tensors).__name__}, not a dict of expert tensors")
            for key, tensor in tensors.items():
                match = EXPERT_KEY.fullmatch(key)
                if match is None or (int(match[1]), int(match[2])) != (layer, expert):
                    raise ValueError(f"{path.name}: unexpected tensor {key!r} for layer {layer}, expert {expert}")
                experts[f"model.language_model.layers.{layer}.mlp.experts.{expert}.{match[3]}.weight"] = tensor
    return experts


def convert(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    protein_padding_length: int = 1024,
    overwrite: bool = False,
    expected_outputs: str | os.PathLike | None = None,
) -> SepitForConditionalGeneration:
    """Convert model and tokenizers (as a `SepitProcessor` in compat mode) and write `output_dir` atomically: a crash
    leaves any previous folder intact. `output_dir` must be new, empty or an earlier conversion (else `overwrite`),
    and never the input folder or inside it (nor around it, nor around `expected_outputs`, which the check reads)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if protein_padding_length < 3:
        raise ValueError(
            f"protein_padding_length={protein_padding_length} must be at least 3 (<cls>, one residue, <eos>); the "
            "release used 1024"
        )
    inputs = [input_dir, expected_outputs]
    with atomic_folder(output_dir, "convert_original_sepit", inputs, overwrite) as staging:  # checked before reading
        model = _converted_model(input_dir)
        _save_converted(model, input_dir, staging, protein_padding_length)
    return model


def _converted_model(input_dir: Path) -> SepitForConditionalGeneration:
    """The original weights (and experts) in a SEPIT-HF model, every tensor checked against its config."""
    original = read_original_config(input_dir)
    state_dict = read_original_weights(input_dir)
    means = state_dict.get("model.structure_module.gaussian_kernels.means")
    if means is None:
        raise ValueError("model.safetensors: no structure_bias.gbf.means; sequence-only checkpoints are not supported")
    config = sepit_config_from_original(original, num_kernels=means.numel())
    if config.num_experts is not None:
        state_dict.update(read_experts(input_dir, config))
    if config.protein_config.position_embedding_type != "absolute":
        # transformers 4.x kept an unused absolute-position table in rotary ESM models.
        state_dict.pop("model.protein_model.embeddings.position_embeddings.weight", None)
    model = SepitForConditionalGeneration(config)
    # The ESM layers above the projected one (and the final norm, the contact head) are never computed: not kept.
    unused = [re.compile(pattern) for pattern in unused_protein_weights(config)]
    state_dict = {k: v for k, v in state_dict.items() if not any(pattern.search(k) for pattern in unused)}
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the SEPIT model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    shapes = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (config: {tuple(shapes[k].shape)})"
        for k, v in state_dict.items()
        if v.shape != shapes[k].shape
    ]
    if wrong:
        raise ValueError(f"weights do not fit the shapes config.json gives: {wrong[:4]}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _save_converted(
    model: SepitForConditionalGeneration, input_dir: Path, staging: Path, protein_padding_length: int
) -> None:
    """The model and the release's tokenizers, as a `SepitProcessor` in compat mode, into `staging`."""
    model.save_pretrained(staging)
    tokenizers = {name: input_dir / name for name in ("text_tokenizer", "protein_tokenizer")}
    missing = [name for name, path in tokenizers.items() if not path.is_dir()]
    if missing:
        raise ValueError(f"input_dir: {input_dir} lacks {missing}, the tokenizer folders of a release")
    processor = SepitProcessor(
        tokenizer=AutoTokenizer.from_pretrained(tokenizers["text_tokenizer"]),
        protein_tokenizer=AutoTokenizer.from_pretrained(tokenizers["protein_tokenizer"]),
        max_protein_length=protein_padding_length - 2,
        original_compat=True,
        protein_padding_length=protein_padding_length,
    )
    if processor.protein_token_id != model.config.protein_token_id:
        raise ValueError(
            f"text_tokenizer: `<protein>` has id {processor.protein_token_id}, the config says "
            f"{model.config.protein_token_id}"
        )
    processor.save_pretrained(staging)


def expand_protein_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    protein_token_id: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Original-format inputs (one `<protein>` per protein, `width` features spliced there) as SEPIT-HF inputs (`width`
    placeholders, attended, label -100). Rows keep their padding side."""
    rows = []
    for row_ids, row_mask, row_labels in zip(
        input_ids.tolist(),
        attention_mask.tolist(),
        labels.tolist() if labels is not None else [None] * len(input_ids),
        strict=True,
    ):
        new_ids, new_mask, new_labels = [], [], []
        for t, token in enumerate(row_ids):
            is_protein = token == protein_token_id
            new_ids += [token] * (width if is_protein else 1)
            new_mask += [1] * width if is_protein else [row_mask[t]]
            new_labels += [-100] * width if is_protein else [row_labels[t] if row_labels is not None else -100]
        rows.append((new_ids, new_mask, new_labels))
    return tuple(torch.tensor([row[i] for row in rows]) for i in range(3))


@torch.no_grad()
def verify_conversion(model: SepitForConditionalGeneration, expected_outputs: str | os.PathLike) -> dict[str, float]:
    """Run the converted model on the batches of an `expected_outputs.safetensors` file and measure the largest
    deviations from the original's outputs: protein features, logits (attended positions), loss, greedy tokens."""
    try:
        expected = load_file(expected_outputs)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"expected_outputs: {expected_outputs} is not a readable safetensors file ({error})"
        ) from error
    batches: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in expected.items():
        batch, name = key.split(".", 1)
        batches.setdefault(batch, {})[name] = tensor
    token = model.config.protein_token_id
    figures = {"max_abs_features": 0.0, "max_abs_logits": 0.0, "max_abs_loss": 0.0, "greedy_token_mismatches": 0}
    for batch in batches.values():
        coords = batch["node_position"]
        proteins = {
            "protein_input_ids": batch["protein_input_ids"],
            "protein_attention_mask": batch["protein_attention_mask"],
            "protein_coords": coords,
            "protein_coords_mask": (coords != 0).any(-1),  # the release marks missing structure with zeros
        }
        width = coords.shape[1]
        features = model.model.get_protein_features(**proteins)
        reference = model.model.multi_modal_projector(
            batch["protein_hidden_states_minus2"].reshape(-1, batch["protein_hidden_states_minus2"].shape[-1])
        )
        figures["max_abs_features"] = max(figures["max_abs_features"], float((features - reference).abs().max()))

        ids, mask, labels = expand_protein_tokens(
            batch["train_input_ids"], batch["train_attention_mask"], batch["train_labels"], token, width
        )
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False, **proteins)
        attended = mask.bool()  # padding positions' logits are meaningless in both implementations
        deviation = float((out.logits[attended] - batch["train_logits"][attended]).abs().max())
        figures["max_abs_logits"] = max(figures["max_abs_logits"], deviation)
        figures["max_abs_loss"] = max(figures["max_abs_loss"], abs(float(out.loss) - float(batch["train_loss"])))

        ids, mask, _ = expand_protein_tokens(batch["gen_input_ids"], batch["gen_attention_mask"], None, token, width)
        new_tokens = batch["gen_output_ids"][:, batch["gen_input_ids"].shape[1] :]
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **proteins,
            max_new_tokens=new_tokens.shape[1],
            do_sample=False,
            pad_token_id=model.config.text_config.pad_token_id,
            eos_token_id=model.config.text_config.eos_token_id,
            suppress_tokens=[],  # the release can emit `<protein>` (embedded as text); SEPIT models suppress it
        )[:, ids.shape[1] :]
        figures["greedy_token_mismatches"] += int((generated != new_tokens).sum())
    return figures


def kernel_report(model: SepitForConditionalGeneration) -> dict[str, float | bool]:
    """What the release's structure module learned: the Gaussian kernels' means and widths, and how much the attention
    bias it gives a residue pair varies with their distance over 2-40 Angstrom (max over heads of max - min).

    The original builds its kernels with `nn.init.uniform_` in the constructor, but always loads the encoder with
    `from_pretrained`, which (transformers 4.39) leaves such weights at 0; with mean = width = 0 their gradient is 0
    too, so they never move, and the bias would not depend on distance at all: `degenerate` says so."""
    structure = model.model.structure_module
    kernels = structure.gaussian_kernels
    with torch.no_grad():
        distances = torch.linspace(2.0, 40.0, 77)
        bias = structure.kernel_proj_out(F.gelu(structure.kernel_proj_in(kernels(distances))))  # (distances, heads)
        variation = float((bias.max(0).values - bias.min(0).values).max())
        report = {
            "means_min": float(kernels.means.min()),
            "means_max": float(kernels.means.max()),
            "widths_min": float(kernels.stds.abs().min()),
            "widths_max": float(kernels.stds.abs().max()),
            "bias_variation_2_40A": variation,
        }
    report["degenerate"] = variation < 1e-6
    return report


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([ConversionArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        model = convert(
            args.input_dir, args.output_dir, args.protein_padding_length, args.overwrite, args.expected_outputs
        )
        print(f"converted {args.input_dir} -> {args.output_dir}")
        report = kernel_report(model)
        print("structure kernels: " + ", ".join(f"{k}={v:.4g}" for k, v in report.items() if k != "degenerate"))
        if report["degenerate"]:
            print(
                "the release's structure bias does not vary with distance between 2 and 40 A: its Gaussian kernels "
                "were never trained (means and widths left at their load-time value); the structure enters only "
                "through a distance-independent bias"
            )
        if args.expected_outputs:
            figures = verify_conversion(model, args.expected_outputs)
            print("parity with the original outputs: " + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    except ValueError as error:
        print(f"convert_original_sepit: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
