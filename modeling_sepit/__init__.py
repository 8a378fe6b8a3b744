"""SEPIT for Hugging Face transformers. Importing this package registers SEPIT with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_sepit import SepitConfig
from .modeling_moe import SepitSparseMoeBlock, SepitTopKRouter
from .modeling_sepit import SepitForConditionalGeneration, SepitModel, SepitPreTrainedModel
from .modeling_sepit_pretraining import (
    SepitForProteinPretraining,
    SepitPretrainingCollator,
    SepitProteinPretrainingConfig,
    load_pretrained_encoder,
)
from .modeling_structure import SepitStructureModule
from .pipeline_protein_qa import ProteinQuestionAnsweringPipeline
from .processing_sepit import SepitDataCollator, SepitProcessor
from .structure_loading import ProteinStructure, align_structure_to_sequence, load_structure

AutoConfig.register(SepitConfig.model_type, SepitConfig)
AutoModel.register(SepitConfig, SepitForConditionalGeneration)
AutoModelForCausalLM.register(SepitConfig, SepitForConditionalGeneration)
AutoProcessor.register(SepitConfig, SepitProcessor)
AutoConfig.register(SepitProteinPretrainingConfig.model_type, SepitProteinPretrainingConfig)
AutoModel.register(SepitProteinPretrainingConfig, SepitForProteinPretraining)
PIPELINE_REGISTRY.register_pipeline(
    "protein-qa", pipeline_class=ProteinQuestionAnsweringPipeline, pt_model=AutoModelForCausalLM, type="multimodal"
)
# `save_pretrained` then writes `auto_map` and copies these files, for `trust_remote_code` without this package.
SepitConfig.register_for_auto_class()
SepitForConditionalGeneration.register_for_auto_class("AutoModel")
SepitProcessor.register_for_auto_class()

__all__ = [
    "ProteinQuestionAnsweringPipeline",
    "ProteinStructure",
    "SepitConfig",
    "SepitDataCollator",
    "SepitProcessor",
    "align_structure_to_sequence",
    "load_pretrained_encoder",
    "load_structure",
    "SepitForConditionalGeneration",
    "SepitForProteinPretraining",
    "SepitModel",
    "SepitPreTrainedModel",
    "SepitPretrainingCollator",
    "SepitProteinPretrainingConfig",
    "SepitSparseMoeBlock",
    "SepitStructureModule",
    "SepitTopKRouter",
]
