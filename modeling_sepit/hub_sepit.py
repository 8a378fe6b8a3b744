"""A Hub-ready SEPIT folder (model, processor, pipeline code, `auto_map`) and its upload."""

import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import pipeline

from .atomic_folder import atomic_folder
from .modeling_sepit import SepitForConditionalGeneration
from .processing_sepit import SepitProcessor

USAGE = """```python
from transformers import AutoModel, pipeline

qa = pipeline("protein-qa", model="{repo}", trust_remote_code=True)
qa({{"question": "What is the function of this protein? <protein>", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"}})
qa({{"question": "Does this protein bind metal ions? <protein>", "structure": "1aki.pdb", "chain": "A"}})
model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)  # SepitForConditionalGeneration
```"""


def model_card(
    repo: str,
    summary: str,
    results: str,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """A model card (Hub YAML metadata + text) for a SEPIT folder: what it is, how to use it, how it was trained
    (`summary`) and what it scored (`results`, markdown), so a published folder says what was measured."""
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["sepit", "protein", "protein-question-answering", "esm2", "custom_code"],
        base_model=base_models or None,
        datasets=datasets or None,
    )
    text = "\n\n".join(
        [
            f"---\n{data.to_yaml()}\n---",
            f"# {repo}",
            "SEPIT (Structure-Enhanced Protein Instruction Tuning, Wu et al., "
            "[arXiv 2410.03553](https://arxiv.org/abs/2410.03553)): an ESM-2 encoder with a structure-aware attention "
            "bias, a projector, and a chat LLM that answers questions about a protein given by its sequence and, "
            "optionally, its 3D structure.",
            "## Usage",
            USAGE.format(repo=repo),
            "## Training",
            summary,
            "## Evaluation",
            results,
        ]
    )
    return ModelCard(text)


def save_hub_folder(
    model: SepitForConditionalGeneration,
    processor: SepitProcessor,
    folder: str | os.PathLike,
    card: ModelCard | None = None,
) -> Path:
    """Write model weights (safetensors), config with `auto_map` and `custom_pipelines`, the remote code, the processor
    (both tokenizers, chat template) and the model card (`README.md`, when given) into `folder`, atomically: a crash
    leaves the previous folder intact."""
    with atomic_folder(folder) as staging:
        qa = pipeline("protein-qa", model=model, processor=processor)
        qa.save_pretrained(staging)  # model, config.custom_pipelines, pipeline and modeling code
        processor.save_pretrained(staging)  # pipelines do not save a ProcessorMixin themselves
        if card is not None:
            card.save(staging / "README.md")
    return Path(folder)


def push_hub_folder(
    folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False, commit_message: str = ""
) -> str:
    """Upload a folder written by `save_hub_folder` to a model repository; returns the commit URL."""
    folder = Path(folder)
    missing = [
        name for name in ("config.json", "model.safetensors", "processor_config.json") if not (folder / name).is_file()
    ]
    if missing:
        raise ValueError(f"{folder}: not a complete SEPIT folder (missing {missing}); write it with save_hub_folder")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message or "Upload SEPIT"
    )
    return str(commit)  # a CommitInfo is the commit URL (a str subclass)


__all__ = ["model_card", "push_hub_folder", "save_hub_folder"]
