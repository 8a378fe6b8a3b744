"""transformers' ProcessorTesterMixin run against SepitProcessor, built offline from the tokenizers of the tiny
original-format fixture (a small Llama-style text tokenizer and the ESM-2 tokenizer)."""

import unittest
from pathlib import Path

from tests.test_processing_common import ProcessorTesterMixin
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modeling_sepit import SepitProcessor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sepit-original" / "original-tiny-dense"


class SepitProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """The mixin's processor tests; the image/video/audio ones skip themselves (SepitProcessor has no such part)."""

    processor_class = SepitProcessor

    @classmethod
    def _setup_tokenizer(cls) -> PreTrainedTokenizerBase:
        """The LLM tokenizer (the processor adds `<protein>` to it when missing)."""
        return AutoTokenizer.from_pretrained(FIXTURE / "text_tokenizer")

    @classmethod
    def _setup_protein_tokenizer(cls) -> PreTrainedTokenizerBase:
        """The ESM-2 tokenizer."""
        return AutoTokenizer.from_pretrained(FIXTURE / "protein_tokenizer")
