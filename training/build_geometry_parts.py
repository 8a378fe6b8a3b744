"""Randomly initialised parts at the geometry of real checkpoints, for benchmarks that must measure what users run:
ESM-2 650M / 35M / 8M and TinyLlama-1.1B-Chat / SmolLM2-135M, written down here from their published configs (no Hub
access at run time), saved as `protein_model/` and `language_model/` folders that the benchmarks' `--parts` take.

The weights are random, so the outputs mean nothing; the shapes, hence the time and memory of every matmul and
attention, are those of the real models. The LLM folder carries a tokenizer given by `--text_tokenizer` (e.g. the tiny
parts' BPE): the real ones cannot be downloaded here, and a benchmark needs only its ids and special tokens. Its size
must stay below the geometry's vocabulary, so that `<protein>` gets an id inside the embedding matrix.

    python training/build_geometry_parts.py --protein_geometry esm2_650m --llm_geometry tinyllama_1.1b \\
        --text_tokenizer outputs/main/parts/language_model --output_dir outputs/paper-parts
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, EsmConfig, EsmForMaskedLM, LlamaConfig, LlamaForCausalLM, set_seed

from modeling_sepit.atomic_folder import atomic_folder, check_output_path
from modeling_sepit.cli_sepit import script_parser

PROTEIN_TOKENIZER = Path(__file__).resolve().parent / "recipes" / "tiny" / "protein_tokenizer"
WRITER = "build_geometry_parts"

# facebook/esm2_t33_650M_UR50D, esm2_t12_35M_UR50D, esm2_t6_8M_UR50D: (layers, hidden, heads, intermediate); all
# share vocabulary 33, rotary positions, token dropout, 1026 positions, no pre-embedding layer norm, eps 1e-5.
PROTEIN_GEOMETRIES = {
    "esm2_650m": (33, 1280, 20, 5120),
    "esm2_35m": (12, 480, 20, 1920),
    "esm2_8m": (6, 320, 20, 1280),
}
# TinyLlama/TinyLlama-1.1B-Chat-v1.0 and HuggingFaceTB/SmolLM2-135M-Instruct.
LLM_GEOMETRIES = {
    "tinyllama_1.1b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "smollm2_135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
}


@dataclass
class GeometryPartsArguments:
    """Which real geometries to build, and the tokenizer the LLM folder carries."""

    text_tokenizer: str = field(metadata={"help": "Folder of a text tokenizer smaller than the LLM's vocabulary."})
    output_dir: str = field(metadata={"help": "Folder for protein_model/ and language_model/."})
    protein_geometry: str = field(default="esm2_650m", metadata={"help": f"One of {sorted(PROTEIN_GEOMETRIES)}."})
    llm_geometry: str = field(default="tinyllama_1.1b", metadata={"help": f"One of {sorted(LLM_GEOMETRIES)}."})
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisations."})
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir even if it holds other files."})

    def __post_init__(self) -> None:
        for name, value, known in (
            ("protein_geometry", self.protein_geometry, PROTEIN_GEOMETRIES),
            ("llm_geometry", self.llm_geometry, LLM_GEOMETRIES),
        ):
            if value not in known:
                raise ValueError(f"{name}: unknown geometry {value!r}; choose one of {sorted(known)}")
        check_output_path(self.output_dir, WRITER, [self.text_tokenizer], self.overwrite)


def protein_config(geometry: str, protein_tokenizer) -> EsmConfig:
    """ESM-2's config at `geometry` (a key of `PROTEIN_GEOMETRIES`)."""
    layers, hidden, heads, intermediate = PROTEIN_GEOMETRIES[geometry]
    return EsmConfig(
        vocab_size=len(protein_tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mask_token_id=protein_tokenizer.mask_token_id,
        pad_token_id=protein_tokenizer.pad_token_id,
    )


def llm_config(geometry: str, text_tokenizer) -> LlamaConfig:
    """The LLM's config at `geometry` (a key of `LLM_GEOMETRIES`), with the special-token ids of `text_tokenizer`."""
    values = dict(LLM_GEOMETRIES[geometry])
    if len(text_tokenizer) >= values["vocab_size"]:
        raise ValueError(
            f"text_tokenizer: {len(text_tokenizer)} tokens do not fit {geometry}'s vocabulary of "
            f"{values['vocab_size']} with `<protein>` added; give a smaller tokenizer (e.g. the tiny parts' "
            "language_model folder)"
        )
    rope_theta = values.pop("rope_theta")
    return LlamaConfig(
        **values,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        hidden_act="silu",
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
    )


def build_geometry_parts(args: GeometryPartsArguments) -> Path:
    """Write the two parts into `output_dir` (atomically), one model in memory at a time, and return it."""
    set_seed(args.seed)
    protein_tokenizer = AutoTokenizer.from_pretrained(PROTEIN_TOKENIZER)
    text_tokenizer = AutoTokenizer.from_pretrained(args.text_tokenizer)
    configs = (
        ("protein_model", EsmForMaskedLM, protein_config(args.protein_geometry, protein_tokenizer), protein_tokenizer),
        ("language_model", LlamaForCausalLM, llm_config(args.llm_geometry, text_tokenizer), text_tokenizer),
    )
    with atomic_folder(args.output_dir, WRITER, [args.text_tokenizer], args.overwrite) as staging:
        for name, model_class, config, tokenizer in configs:
            with torch.no_grad():
                model = model_class(config)
            model.save_pretrained(staging / name)
            tokenizer.save_pretrained(staging / name)
            del model
    return Path(args.output_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = script_parser([GeometryPartsArguments], __doc__).parse_args_into_dataclasses(args=argv)
        print(f"geometry parts written to {build_geometry_parts(args)}")
    except ValueError as error:
        print(f"build_geometry_parts: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
