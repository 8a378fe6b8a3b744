"""Tiny, randomly initialised parts for the CPU recipe: an ESM-2-shaped encoder, a Llama-shaped chat LLM and a
BERT-shaped frozen caption encoder, saved as `from_pretrained` folders so the stage scripts load them exactly as they
load facebook/esm2_t33_650M_UR50D, TinyLlama-1.1B-Chat and PubMedBERT.

The protein tokenizer is ESM-2's own vocabulary (`recipes/tiny/protein_tokenizer`); the text tokenizer is a byte-level
BPE trained (by the `tokenizers` library) on the dataset's own captions, questions and answers, because no real
tokenizer can be downloaded here.

    python training/build_tiny_parts.py --dataset_dir outputs/dataset --output_dir outputs/tiny-parts
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    EsmConfig,
    EsmForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    set_seed,
)

from modeling_sepit.atomic_folder import atomic_folder, check_output_path
from modeling_sepit.cli_sepit import script_parser

PROTEIN_TOKENIZER = Path(__file__).resolve().parent / "recipes" / "tiny" / "protein_tokenizer"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
WRITER = "build_tiny_parts"


@dataclass
class TinyPartsArguments:
    """Sizes of the tiny parts; the defaults train in minutes on two CPU cores."""

    dataset_dir: str = field(metadata={"help": "Built dataset folder whose train texts train the BPE tokenizer."})
    output_dir: str = field(metadata={"help": "Folder for protein_model/, language_model/, text_encoder/."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size of the text tokenizer."})
    hidden_size: int = field(default=128, metadata={"help": "Hidden size of the LLM."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers of the LLM."})
    protein_hidden_size: int = field(default=64, metadata={"help": "Hidden size of the ESM encoder."})
    protein_layers: int = field(default=3, metadata={"help": "Layers of the ESM encoder."})
    protein_heads: int = field(default=4, metadata={"help": "Attention heads of the ESM encoder."})
    protein_intermediate_size: int | None = field(
        default=None, metadata={"help": "Feed-forward width of the ESM encoder (default: 2 x its hidden size)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisations."})
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir even if it holds other files."})

    def __post_init__(self) -> None:
        if self.protein_heads < 1 or self.protein_hidden_size % self.protein_heads:
            raise ValueError(
                f"protein_heads: {self.protein_heads} does not divide protein_hidden_size={self.protein_hidden_size}; "
                "give a head count that divides it (ESM-2 8M: 20 heads of 16)"
            )
        check_output_path(self.output_dir, WRITER, [self.dataset_dir], self.overwrite)  # before training a tokenizer


def _texts(dataset_dir: str) -> Iterator[str]:
    for config in ("captions", "instructions"):
        for row in load_dataset(dataset_dir, config, split="train"):
            for message in row["messages"]:
                yield message["content"]


def train_text_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown bytes) with Llama's special-token names."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_parts(args: TinyPartsArguments) -> Path:
    """Write the three parts into `output_dir` (atomically) and return it."""
    set_seed(args.seed)
    text_tokenizer = train_text_tokenizer(_texts(args.dataset_dir), args.vocab_size)
    protein_tokenizer = AutoTokenizer.from_pretrained(PROTEIN_TOKENIZER)
    esm_config = EsmConfig(
        vocab_size=len(protein_tokenizer),
        hidden_size=args.protein_hidden_size,
        num_hidden_layers=args.protein_layers,
        num_attention_heads=args.protein_heads,
        intermediate_size=args.protein_intermediate_size or 2 * args.protein_hidden_size,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        mask_token_id=protein_tokenizer.mask_token_id,
        pad_token_id=protein_tokenizer.pad_token_id,
    )
    llama_config = LlamaConfig(
        vocab_size=len(text_tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    bert_config = BertConfig(
        vocab_size=len(text_tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        pad_token_id=text_tokenizer.pad_token_id,
    )
    with atomic_folder(args.output_dir, WRITER, [args.dataset_dir], args.overwrite) as staging:
        for name, model, tokenizer in (
            ("protein_model", EsmForMaskedLM(esm_config), protein_tokenizer),
            ("language_model", LlamaForCausalLM(llama_config), text_tokenizer),
            ("text_encoder", BertModel(bert_config, add_pooling_layer=False), text_tokenizer),
        ):
            model.save_pretrained(staging / name)
            tokenizer.save_pretrained(staging / name)
    return Path(args.output_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = script_parser([TinyPartsArguments], __doc__).parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        print(f"build_tiny_parts: error: {error}", file=sys.stderr)
        return 2
    print(f"tiny parts written to {build_tiny_parts(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
