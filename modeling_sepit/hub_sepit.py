"""A Hub-ready SEPIT folder (model, processor, pipeline code, `auto_map`) and its upload."""

import os
from pathlib import Path

from huggingface_hub import HfApi
from transformers import pipeline

from .atomic_folder import atomic_folder
from .modeling_sepit import SepitForConditionalGeneration
from .processing_sepit import SepitProcessor


def save_hub_folder(model: SepitForConditionalGeneration, processor: SepitProcessor, folder: str | os.PathLike) -> Path:
    """Write model weights (safetensors), config with `auto_map` and `custom_pipelines`, the remote code, the processor
    (both tokenizers, chat template) into `folder`, atomically: a crash leaves the previous folder intact."""
    with atomic_folder(folder) as staging:
        qa = pipeline("protein-qa", model=model, processor=processor)
        qa.save_pretrained(staging)  # model, config.custom_pipelines, pipeline and modeling code
        processor.save_pretrained(staging)  # pipelines do not save a ProcessorMixin themselves
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


__all__ = ["push_hub_folder", "save_hub_folder"]
