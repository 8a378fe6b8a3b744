"""A SEPIT model's LLM as a stock transformers checkpoint, which vLLM, TGI or llama.cpp serve with no SEPIT code.

    sepit-export-llm --model_name_or_path SEPIT_FOLDER --output_dir LLM_FOLDER

A dense LLM is written as its own architecture (Llama, Qwen2, Mistral, ...). An upcycled (stage 2) LLM with
renormalised top-k routing (`norm_topk_prob=True`) computes what Mixtral computes, and is written as a
`MixtralForCausalLM` checkpoint (experts, router and shared settings mapped; saved in Mixtral's usual per-expert
`w1/w2/w3` layout). The original release's un-normalised routing, an expert capacity at evaluation (tokens dropped)
and LLMs whose layers Mixtral lacks (attention or MLP biases, as Qwen2's) cannot be expressed: they are refused.

The folder also holds the LLM tokenizer (with `<protein>`), a generation config that suppresses `<protein>` as
SEPIT's `generate` does, and `sepit_export.json`, naming the SEPIT folder it came from. The serving side computes the
prompt embeddings with that SEPIT folder (`prompt_embeddings`: the processor's expansion of `<protein>`, the encoder,
the structure module, the projector and the splice into the token embeddings, exactly as SEPIT's forward does) and
gives them to the LLM as `inputs_embeds` (`prompt_embeds` in vLLM); `load_protein_side` loads that folder without its
LLM's decoder layers. The SEPIT folder is referenced rather than copied: it is the one place its encoder, projector
and processor live, so the two sides cannot drift apart.
"""

import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .atomic_folder import atomic_folder
from .cli_sepit import script_parser
from .configuration_sepit import MOE_FIELDS, SepitConfig
from .modeling_sepit import SepitForConditionalGeneration
from .processing_sepit import SepitProcessor

WRITER = "sepit-export-llm"
EXPORT_FILE = "sepit_export.json"
# Dense LLMs whose decoder layers are Mixtral's once the FFN is a mixture of experts (no biases, same attention).
MIXTRAL_COMPATIBLE = ("llama", "mistral")
# Mixtral's per-expert names (those of every Mixtral release, which save_pretrained writes back) for SEPIT's experts.
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def check_exportable(config: PreTrainedConfig) -> None:
    """ValueError naming the field when the LLM of a SEPIT config cannot be written as a stock checkpoint that
    computes the same logits."""
    text_config = config.text_config
    if text_config.num_experts is None:
        if type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"text_config.model_type={text_config.model_type!r} has no causal-LM class in transformers: nothing "
                "stock to export it as"
            )
        return
    if not text_config.norm_topk_prob:
        raise ValueError(
            "text_config.norm_topk_prob=False: the original release's un-normalised top-k routing (each chosen "
            "expert weighted by its raw router probability) cannot be expressed in Mixtral, which renormalises the "
            "top-k weights; only an MoE upcycled with norm_topk_prob=True exports as MixtralForCausalLM"
        )
    if text_config.expert_eval_capacity_factor is not None:
        raise ValueError(
            f"text_config.expert_eval_capacity_factor={text_config.expert_eval_capacity_factor}: SEPIT drops tokens "
            "beyond an expert's capacity at evaluation, which Mixtral never does; set it to null in config.json "
            "(the SEPIT model then computes what the export computes) and export again"
        )
    if text_config.model_type not in MIXTRAL_COMPATIBLE:
        raise ValueError(
            f"text_config.model_type={text_config.model_type!r}: an MoE exports as MixtralForCausalLM, whose layers "
            f"are those of {' or '.join(MIXTRAL_COMPATIBLE)} (a Qwen2 LLM's attention has biases Mixtral lacks)"
        )
    for name in ("attention_bias", "mlp_bias"):
        if getattr(text_config, name, False):
            raise ValueError(f"text_config.{name}=True: Mixtral's layers have no biases; this LLM cannot be exported")


def mixtral_config(text_config: PreTrainedConfig) -> MixtralConfig:
    """The Mixtral config of an upcycled Llama or Mistral LLM: its shapes, attention and RoPE, and its experts."""
    shared = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "attention_dropout",
        "rope_parameters",
        "num_experts_per_tok",
        "router_aux_loss_coef",
    )
    return MixtralConfig(
        **{name: getattr(text_config, name) for name in shared},
        num_local_experts=text_config.num_experts,
        sliding_window=getattr(text_config, "sliding_window", None),
        output_router_logits=False,
        architectures=[MixtralForCausalLM.__name__],
    )


def dense_config(text_config: PreTrainedConfig) -> PreTrainedConfig:
    """The LLM's own config, without the MoE fields SEPIT keeps on every text config (a dense LLM has none)."""
    own_fields = {item.name for item in dataclasses.fields(type(text_config))}
    values = {k: v for k, v in text_config.to_dict().items() if k not in MOE_FIELDS or k in own_fields}
    values["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)].__name__]
    return type(text_config).from_dict(values)


def stock_state_dict(model: SepitForConditionalGeneration, prefix: str) -> dict[str, torch.Tensor]:
    """The LLM's weights under a stock causal LM's names (`prefix`: its base model's); experts under Mixtral's
    per-expert names, which transformers' Mixtral fuses on loading."""
    state_dict = {"lm_head.weight": model.lm_head.weight}
    for key, value in model.model.language_model.state_dict().items():
        if ".mlp.experts." in key or ".mlp.gate." in key:
            key = key.replace(".mlp.", ".block_sparse_moe.")
            for ours, theirs in EXPERT_NAMES.items():
                key = key.replace(f".{ours}.", f".{theirs}.")
        state_dict[f"{prefix}.{key}"] = value
    return state_dict


def stock_causal_lm(model: SepitForConditionalGeneration) -> PreTrainedModel:
    """The LLM of `model` (LM head included) as a stock transformers causal LM, in memory (see the module docstring);
    ValueError when it cannot be expressed (`check_exportable`)."""
    check_exportable(model.config)
    text_config = model.config.text_config
    if text_config.num_experts is None:
        config = dense_config(text_config)
        causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    else:
        config, causal_lm_class = mixtral_config(text_config), MixtralForCausalLM
    dtype = model.lm_head.weight.dtype
    config.dtype = dtype
    state_dict = stock_state_dict(model, causal_lm_class.base_model_prefix)
    causal_lm, info = causal_lm_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    left = {name: sorted(info[name]) for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[name]}
    if left:  # a layout this module does not know: never write a checkpoint with random or dropped weights
        raise ValueError(f"model: its LLM does not map onto {causal_lm_class.__name__} ({left})")
    causal_lm.generation_config = copy.deepcopy(model.generation_config)
    if causal_lm.generation_config.suppress_tokens is None:
        # SEPIT's generate never emits `<protein>` (a generated placeholder has no protein to splice): nor does this.
        causal_lm.generation_config.suppress_tokens = [model.config.protein_token_id]
    return causal_lm.eval()


class _Captured(Exception):
    """Carries the LLM's `inputs_embeds` out of SEPIT's forward, before any LLM layer runs."""


@torch.no_grad()
def prompt_embeddings(model: SepitForConditionalGeneration, **inputs) -> torch.Tensor:
    """The input embeddings SEPIT's LLM receives for `inputs` (the processor's output: `input_ids`, `attention_mask`
    and the protein tensors, or `mm_encoder_outputs`): token embeddings with the protein features spliced at the
    `<protein>` placeholders. They are taken from SEPIT's own forward, stopped as its LLM is called, so they are what
    SEPIT computes, checks included, for every setting (pooling, `original_compat`, precomputed features)."""

    def capture(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        raise _Captured(kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model.model(**inputs, use_cache=False)
    except _Captured as captured:
        return captured.args[0]
    finally:
        hook.remove()
    raise RuntimeError("SEPIT's forward returned without calling its LLM")


class SepitProteinSide(SepitForConditionalGeneration):
    """A SEPIT model loaded without its LLM's decoder layers (`load_protein_side`): encoder, structure module, projector
    and token embeddings, for `prompt_embeddings` only (its logits mean nothing). The layers' weights in the folder
    are left out on purpose, so they are not reported as unexpected."""

    _keys_to_ignore_on_load_unexpected = [r"\.language_model\.layers\."]


def load_protein_side(model_name_or_path: str | os.PathLike, **kwargs) -> tuple[SepitProteinSide, SepitProcessor]:
    """What a server beside the exported LLM needs for `prompt_embeddings`: the SEPIT model without its LLM's decoder
    layers (so the LLM's weights are not held twice) and its processor. `kwargs` go to `from_pretrained`."""
    config = SepitConfig.from_pretrained(model_name_or_path)
    config.text_config.num_hidden_layers = 0
    model = SepitProteinSide.from_pretrained(model_name_or_path, config=config, **kwargs)
    return model.eval(), SepitProcessor.from_pretrained(model_name_or_path)


def source_reference(model_name_or_path: str | os.PathLike) -> str:
    """How the export names its SEPIT folder: a local folder by its absolute path, a Hub id as given."""
    path = Path(model_name_or_path)
    return str(path.resolve()) if path.is_dir() else str(model_name_or_path)


def export_llm(model_name_or_path: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the LLM of the SEPIT model at `model_name_or_path` (a folder or Hub id) to `output_dir` as a stock
    checkpoint, atomically: a new or empty folder, or an earlier export (else `overwrite`); never the SEPIT folder."""
    with atomic_folder(output_dir, WRITER, [model_name_or_path], overwrite) as staging:
        try:
            config = SepitConfig.from_pretrained(model_name_or_path)
        except OSError as error:
            raise ValueError(
                f"model_name_or_path: no SEPIT config loads from {model_name_or_path} "
                f"({str(error).strip().splitlines()[0]}); give a SEPIT folder or Hub id"
            ) from error
        check_exportable(config)  # before any weight is read: a refusal costs nothing
        model = SepitForConditionalGeneration.from_pretrained(model_name_or_path, config=config)
        try:
            processor = SepitProcessor.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"model_name_or_path: no SEPIT processor loads from {model_name_or_path} "
                f"({str(error).strip().splitlines()[0]}); save the processor beside the model"
            ) from error
        causal_lm = stock_causal_lm(model)
        causal_lm.save_pretrained(staging)
        processor.tokenizer.save_pretrained(staging)
        record = {
            "sepit_model": source_reference(model_name_or_path),
            "architecture": causal_lm.config.architectures[0],
            "protein_token_id": model.config.protein_token_id,
            "hidden_size": model.config.text_config.hidden_size,
            "protein_side": f"{__name__}.{load_protein_side.__name__}",
            "prompt_embeddings": f"{__name__}.{prompt_embeddings.__name__}",
        }
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return Path(output_dir)


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "SEPIT folder (or Hub id) whose LLM is exported."})
    output_dir: str = field(
        metadata={"help": "Folder to write the stock checkpoint to (atomically; new, empty or an earlier export)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir even if it holds other files."})


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([ExportArguments], __doc__)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        output = export_llm(args.model_name_or_path, args.output_dir, args.overwrite)
        record = json.loads((output / EXPORT_FILE).read_text(encoding="utf-8"))
        print(f"exported the LLM of {args.model_name_or_path} -> {output} ({record['architecture']})")
    except ValueError as error:
        print(f"{WRITER}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
