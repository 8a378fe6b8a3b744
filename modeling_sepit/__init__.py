"""SEPIT for Hugging Face transformers. Importing this package registers SEPIT with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_sepit import SepitConfig
from .modeling_moe import SepitSparseMoeBlock, SepitTopKRouter
from .modeling_sepit import SepitForConditionalGeneration, SepitModel, SepitPreTrainedModel
from .modeling_structure import SepitStructureModule

AutoConfig.register(SepitConfig.model_type, SepitConfig)
AutoModel.register(SepitConfig, SepitForConditionalGeneration)
AutoModelForCausalLM.register(SepitConfig, SepitForConditionalGeneration)
# `save_pretrained` then writes `auto_map` and copies these files, for `trust_remote_code` without this package.
SepitConfig.register_for_auto_class()
SepitForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "SepitConfig",
    "SepitForConditionalGeneration",
    "SepitModel",
    "SepitPreTrainedModel",
    "SepitSparseMoeBlock",
    "SepitStructureModule",
    "SepitTopKRouter",
]
