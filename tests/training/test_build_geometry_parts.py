"""training/build_geometry_parts.py: the real models' shapes, written down without the Hub."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, EsmForMaskedLM, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "training"))
from build_geometry_parts import PROTEIN_TOKENIZER, llm_config, main, protein_config  # noqa: E402
from build_tiny_parts import train_text_tokenizer  # noqa: E402


class Tokenizer:
    """The special-token ids and size `llm_config` reads from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def parameters(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def test_llm_geometries_have_the_published_parameter_counts():
    # TinyLlama-1.1B: 1,100,048,384 parameters; SmolLM2-135M (tied embeddings): 134,515,008.
    assert parameters(LlamaForCausalLM, llm_config("tinyllama_1.1b", Tokenizer(2048))) == 1_100_048_384
    assert parameters(LlamaForCausalLM, llm_config("smollm2_135m", Tokenizer(2048))) == 134_515_008
    config = llm_config("tinyllama_1.1b", Tokenizer(2048))
    assert (config.num_key_value_heads, config.rope_parameters["rope_theta"], config.rms_norm_eps) == (4, 1e4, 1e-5)


@pytest.mark.parametrize(
    ("geometry", "shape", "millions"),
    [
        ("esm2_650m", (33, 1280, 20, 5120), 651),
        ("esm2_35m", (12, 480, 20, 1920), 34),
        ("esm2_8m", (6, 320, 20, 1280), 8),
    ],
)
def test_protein_geometries(geometry, shape, millions):
    config = protein_config(geometry, AutoTokenizer.from_pretrained(PROTEIN_TOKENIZER))
    layers = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)
    assert layers == shape
    assert (config.vocab_size, config.position_embedding_type, config.token_dropout) == (33, "rotary", True)
    assert round(parameters(EsmForMaskedLM, config) / 1e6) == millions


def test_a_tokenizer_too_large_for_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="text_tokenizer: 32000 tokens do not fit tinyllama_1.1b"):
        llm_config("tinyllama_1.1b", Tokenizer(32000))


def test_builds_loadable_parts(tmp_path, capsys):
    texts = ["What is the function of this protein?", "It binds ATP and hydrolyses it."] * 20
    train_text_tokenizer(iter(texts), 300).save_pretrained(tmp_path / "tokenizer")
    output = tmp_path / "parts"
    argv = ["--text_tokenizer", str(tmp_path / "tokenizer"), "--output_dir", str(output)]
    assert main([*argv, "--protein_geometry", "esm2_8m", "--llm_geometry", "smollm2_135m"]) == 0
    language = json.loads((output / "language_model" / "config.json").read_text())
    assert (language["hidden_size"], language["num_hidden_layers"], language["vocab_size"]) == (576, 30, 49152)
    with safe_open(output / "language_model" / "model.safetensors", "pt") as weights:
        assert sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()) == 134_515_008
    assert AutoTokenizer.from_pretrained(output / "protein_model").mask_token_id == 32
    assert main([*argv, "--llm_geometry", "llama_7b"]) == 2
    assert "llm_geometry: unknown geometry 'llama_7b'" in capsys.readouterr().err
