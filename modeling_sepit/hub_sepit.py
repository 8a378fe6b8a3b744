"""A Hub-ready SEPIT folder (model, processor, pipeline code, `auto_map`), its upload, and the offline check of the
command lines' model arguments."""

import os
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import pipeline

from .atomic_folder import MARKER, atomic_folder
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
    (`summary`) and what it scored (`results`, markdown), so a published folder says what was measured.

    `pipeline_tag: other`: the Hub knows no task whose input is a protein, and the tag picks the page's inference
    widget. `text-generation` (or no tag, which leaves the Hub to infer one from the config's Auto classes) would offer
    a text box that cannot give the model its protein; `other` shows none. The task is named in the tags instead
    (`protein-qa`, the custom pipeline that `config.json`'s `custom_pipelines` declares, with the usage snippet
    below)."""
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="other",
        tags=["sepit", "protein-qa", "protein", "biology", "protein-question-answering", "esm2", "custom_code"],
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
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> Path:
    """Write model weights (safetensors), config with `auto_map` and `custom_pipelines`, the remote code, the processor
    (both tokenizers, chat template) and the model card (`README.md`, when given) into `folder`, atomically: a crash
    leaves the previous folder intact. `folder` must be new, empty or written by this function before (else
    `overwrite`), and never one of `inputs` (the folders the model was read from) or inside one."""
    with atomic_folder(folder, "save_hub_folder", inputs, overwrite, field="folder") as staging:
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
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message or "Upload SEPIT",
        ignore_patterns=[MARKER],  # local bookkeeping: which command wrote the folder
    )
    return str(commit)  # a CommitInfo is the commit URL (a str subclass)


def require_local_or_cached(
    name_or_path: str | os.PathLike | None, what: str, filename: str = "config.json"
) -> str | None:
    """`name_or_path` unchanged if it is not given (None, ""), a local path, a Hub id while the Hub may be reached, or
    a Hub id whose `filename` is in the local Hugging Face cache. Otherwise (`HF_HUB_OFFLINE=1`) a one-line ValueError
    naming the argument `what`, the repository and how to provide it: the command lines call this right after
    parsing, so an offline run that needs a missing Hub file stops before building anything (transformers would fail
    later, with a message that names neither the file nor the repository)."""
    if name_or_path is None or str(name_or_path) == "":
        return name_or_path
    name = str(name_or_path)
    if Path(name).exists() or not constants.HF_HUB_OFFLINE:
        return name
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"{what}: {name} is not a local folder (nor a Hub repo id); pass a local folder") from None
    if isinstance(try_to_load_from_cache(name, filename), str):
        return name
    raise ValueError(
        f"{what}: HF_HUB_OFFLINE=1 and {name} is neither a local folder nor in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}, no {filename}): download it on a machine with internet (`hf download {name}`) "
        "and copy the cache, or pass a local folder"
    )


__all__ = ["model_card", "push_hub_folder", "require_local_or_cached", "save_hub_folder"]
