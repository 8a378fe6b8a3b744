"""`pipeline("protein-qa")`: questions about proteins given by sequence, coordinates or a structure file."""

from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.pipelines.base import PipelineDataset, PipelineIterator

from .processing_sepit import to_protein_input

PROTEIN_KEYS = ("sequence", "structure", "chain", "coords", "coords_mask")
MAX_NEW_TOKENS_LIMIT = 4096


class ProteinQuestionAnsweringPipeline(Pipeline):
    """Input: `{"question": ..., "sequence": ...}`, or `"structure": path` (+ `"chain"`, + optional full `"sequence"`
    to align to), or `"sequence"` + `"coords"`; or a list of those (`batch_size` batches them). The question may hold
    `<protein>`; otherwise the protein goes before it. Output: `{"answer": str}` per input. Generation keyword
    arguments (`max_new_tokens`, `do_sample`, ...) pass through to `generate`."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError("protein-qa needs the SEPIT processor: pass processor=SepitProcessor.from_pretrained(...)")
        self.tokenizer = self.processor.tokenizer

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, list) and not inputs:  # the base class would fail on it with an IndexError
            raise ValueError("protein-qa inputs: an empty list; give one request dict or a non-empty list of them")
        return super().__call__(inputs, *args, **kwargs)

    def _sanitize_parameters(self, **kwargs) -> tuple[dict, dict, dict]:
        generate_kwargs = dict(kwargs.pop("generate_kwargs", None) or {})
        generate_kwargs.update(kwargs)
        limit = generate_kwargs.get("max_new_tokens")
        if limit is not None and not (isinstance(limit, int) and 0 < limit <= MAX_NEW_TOKENS_LIMIT):
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {limit!r}")
        return {}, {"generate_kwargs": generate_kwargs}, {}

    def preprocess(self, inputs: dict) -> dict:
        """Validate one request and load its structure, so that bad input fails before the model runs."""
        if not isinstance(inputs, dict):
            raise ValueError(
                "protein-qa inputs must be dicts like {'question': ..., 'sequence': ...}, "
                f"got {type(inputs).__name__}"
            )
        question = inputs.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question: missing or empty; ask a non-empty question about the protein")
        unknown = set(inputs) - {"question", *PROTEIN_KEYS}
        if unknown:
            raise ValueError(f"unknown input keys {sorted(unknown)}; use question, {', '.join(PROTEIN_KEYS)}")
        protein_fields = {k: inputs[k] for k in PROTEIN_KEYS if inputs.get(k) is not None}
        if "chain" in protein_fields and "structure" not in protein_fields:
            raise ValueError("chain: given without a structure file; add 'structure': path")
        if not protein_fields:
            raise ValueError("no protein given: add 'sequence', 'structure' (a PDB/mmCIF file) or 'coords'")
        loaded = to_protein_input(protein_fields, "protein")
        # Plain data for the processor: under remote code the pipeline and processor modules are separate copies.
        protein = {"sequence": loaded.sequence}
        if loaded.coords is not None:
            protein.update(coords=loaded.coords, coords_mask=loaded.coords_mask)
        tag = self.processor.protein_token
        tags = question.count(tag)
        if tags > 1:
            raise ValueError(f"question: {tags} `{tag}` tags but one protein; keep one `{tag}` or none")
        if tags == 0:
            question = f"{tag}\n{question}"
        return {"question": question, "protein": protein}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # Requests are tokenised together in `_forward`, so a batch is just the list of preprocessed requests.
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_merge_requests)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs: dict, generate_kwargs: dict) -> dict[str, Any]:
        questions = model_inputs["question"]
        proteins: list[dict] = model_inputs["protein"]
        if isinstance(questions, str):  # a single request (no batching)
            questions, proteins = [questions], [proteins]
        conversations = [[{"role": "user", "content": q}] for q in questions]
        batch = self.processor.apply_chat_template(
            conversations, proteins=[[p] for p in proteins], add_generation_prompt=True
        ).to(self.device)
        settings = {"max_new_tokens": 128, "do_sample": False, **generate_kwargs}
        settings.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with torch.no_grad():
            output = self.model.generate(**batch, **settings)
        return {"generated": output[:, batch["input_ids"].shape[1] :]}

    def postprocess(self, model_outputs: dict) -> dict[str, str]:
        generated = model_outputs["generated"]
        tokens = generated[0] if generated.ndim == 2 else generated
        return {"answer": self.tokenizer.decode(tokens, skip_special_tokens=True).strip()}


def _merge_requests(items: list[dict]) -> dict[str, list]:
    return {"question": [item["question"] for item in items], "protein": [item["protein"] for item in items]}


__all__ = ["ProteinQuestionAnsweringPipeline"]
