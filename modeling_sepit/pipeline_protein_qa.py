"""`pipeline("protein-qa")`: questions about proteins given by sequence, coordinates or a structure file, as request
dicts or as chats with protein items; generation follows transformers' `text-generation` pipeline."""

import os
import sys
from collections.abc import Sized
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from transformers import GenerationConfig, Pipeline
from transformers.pipelines.base import PipelineDataset, PipelineIterator
from transformers.pipelines.text_generation import ReturnType
from transformers.utils.chat_template_utils import Chat, is_valid_message

from .processing_sepit import SepitProcessor, split_protein_items, to_protein_input

PROTEIN_KEYS = ("sequence", "structure", "chain", "coords", "coords_mask")
MAX_NEW_TOKENS_LIMIT = 4096
# What `processor.save_pretrained` writes (with `protein_tokenizer/`): a folder holding none of them has no processor.
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "tokenizer.json")


class ProteinQuestionAnsweringPipeline(Pipeline):
    """Answers questions about proteins with a SEPIT model and its processor.

    Inputs, as `text-generation` / `image-text-to-text` take them: one input, a list, a generator, a
    `datasets.Dataset`, or a `KeyDataset` (the last three are streamed and give an iterator of results). An input is
    - a request dict `{"question": ..., "sequence": ...}`, or `"structure": path` (+ `"chain"`, + optional full
      `"sequence"` to align to), or `"sequence"` + `"coords"` (+ `"coords_mask"`); the question may hold one
      `<protein>`, otherwise the protein goes before it;
    - a chat: a list of `{"role", "content"}` messages whose contents are strings or lists of
      `{"type": "text", "text": ...}` and `{"type": "protein", "sequence" | "structure" (+ "chain") | "coords": ...}`
      items. A chat ending with an assistant message is continued (`continue_final_message`), as in transformers.

    Output, as `text-generation`'s: a list of `num_return_sequences` dicts per input (a single input gives that list,
    a list of inputs a list of such lists), each with
    - `"answer"`: the generated text, stripped;
    - `"generated_text"`: with `return_full_text=True` (the default) the question followed by the generated text, or
      for a chat the chat with the new assistant message appended; with `return_full_text=False` the generated text;
    or, with `return_tensors=True`, only `"generated_token_ids"` (the prompt's ids, unpadded, then the generated ids).

    Generation: the model's `generation_config` (a saved `generation_config.json`), overridden by what the caller
    passes (`max_new_tokens`, `num_beams`, `num_return_sequences`, `do_sample`, ..., `generate_kwargs={...}`,
    `generation_config=`); where neither sets `max_new_tokens`, 256, as in `image-text-to-text`. Processor arguments
    (`truncation`, `max_length`, `padding`) or `processor_kwargs={...}` go to the processor; batches are left-padded.
    Without `processor=`, the processor saved in the model's folder is used; the two must agree on the `<protein>` id.
    """

    _load_processor = None  # optional, so that a folder without one gets the error in `_processor_or_explain`
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, model, *args, processor: SepitProcessor | None = None, **kwargs):
        processor = processor if processor is not None else _processor_or_explain(model)
        model_id, processor_id = getattr(model.config, "protein_token_id", None), processor.protein_token_id
        if model_id != processor_id:
            raise ValueError(
                f"protein_token_id: the model's config says {model_id} but the processor's `<protein>` token is "
                f"{processor_id}; use the processor saved with this model (the model would read the proteins' "
                "placeholders as text)"
            )
        super().__init__(model, *args, processor=processor, **kwargs)
        _check_max_new_tokens(self._generate_kwargs)
        if self.tokenizer.pad_token_id is not None:  # as text-generation does with its tokenizer
            self._generation_defaults["pad_token_id"] = self.tokenizer.pad_token_id

    def __call__(self, inputs, **kwargs):
        if isinstance(inputs, list | tuple) and not inputs:  # the base class would fail on it with an IndexError
            raise ValueError("protein-qa inputs: an empty list; give one request dict or chat, or a non-empty list")
        datasets = sys.modules.get("datasets")  # a datasets object exists only if its module was imported
        if isinstance(inputs, TorchIterableDataset) or (
            datasets is not None and isinstance(inputs, datasets.IterableDataset)
        ):
            inputs = (row for row in inputs)
        elif isinstance(inputs, TorchDataset) or (datasets is not None and isinstance(inputs, datasets.Dataset)):
            # Streamed row by row: the base class would turn a KeyDataset of chats into a list of all of them, and
            # would pass a datasets.Dataset whole to `preprocess`.
            inputs = _Rows(inputs)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        max_new_tokens: int | None = None,
        generate_kwargs: dict | None = None,
        return_full_text: bool | None = None,
        return_tensors: bool | None = None,
        return_text: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
        skip_special_tokens: bool | None = None,
        continue_final_message: bool | None = None,
        stop_sequence: str | list[str] | None = None,
        processor_kwargs: dict | None = None,
        truncation: bool | str | None = None,
        padding: bool | str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        generate_kwargs = dict(generate_kwargs or {})
        twice = sorted(set(generate_kwargs) & {*kwargs, *(["max_new_tokens"] if max_new_tokens is not None else [])})
        if twice:
            raise ValueError(f"{twice}: given both directly and in generate_kwargs; give each once")
        generate_kwargs.update(kwargs)
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        _check_max_new_tokens(generate_kwargs)
        if generate_kwargs.get("return_dict_in_generate"):
            raise ValueError(
                "return_dict_in_generate: protein-qa returns text (or token ids with return_tensors=True); call "
                "model.generate for scores or hidden states"
            )
        if "add_special_tokens" in generate_kwargs:
            raise ValueError("add_special_tokens: not an option here; the chat template places the special tokens")
        if stop_sequence is not None:
            generate_kwargs["stop_strings"] = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
            generate_kwargs["tokenizer"] = self.processor.tokenizer
        if getattr(self, "assistant_model", None) is not None:
            generate_kwargs["assistant_model"] = self.assistant_model
        if getattr(self, "assistant_tokenizer", None) is not None:
            generate_kwargs.update(tokenizer=self.processor.tokenizer, assistant_tokenizer=self.assistant_tokenizer)

        processor_kwargs = dict(processor_kwargs or {})
        for name, value in (("truncation", truncation), ("padding", padding), ("max_length", max_length)):
            if value is not None:  # as text-generation: `max_length` also bounds generation
                processor_kwargs[name] = value
        if max_length is not None:
            generate_kwargs["max_length"] = max_length
        if processor_kwargs.get("padding_side", "left") != "left":
            raise ValueError(
                f"padding_side={processor_kwargs['padding_side']!r}: batched generation needs left padding"
            )
        for name in ("text", "proteins", "return_tensors"):
            if name in processor_kwargs:
                raise ValueError(f"processor_kwargs: {name!r} is set by the pipeline; pass the input instead")

        preprocess_params = {}
        if continue_final_message is not None:
            preprocess_params["continue_final_message"] = continue_final_message
        # Flat, as text-generation's: call-time generation arguments update the init-time ones key by key.
        forward_params = generate_kwargs
        if processor_kwargs:
            forward_params["processor_kwargs"] = processor_kwargs

        postprocess_params = {}
        if return_full_text is not None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
            if return_tensors is not None:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            postprocess_params["return_type"] = ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
        elif return_tensors is not None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
            postprocess_params["return_type"] = ReturnType.TENSORS
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = skip_special_tokens
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs: object, continue_final_message: bool | None = None) -> dict:
        """Validate one input, load its structures and render its prompt, so that bad input fails before the model
        runs."""
        if isinstance(inputs, Chat) or (
            isinstance(inputs, list | tuple) and inputs and all(is_valid_message(m) for m in inputs)
        ):
            return {"request": self._chat_request(inputs, continue_final_message)}
        if not isinstance(inputs, dict):
            raise ValueError(
                "protein-qa inputs must be dicts like {'question': ..., 'sequence': ...} or chats (lists of "
                f"{{'role', 'content'}} messages), got {type(inputs).__name__}"
            )
        if continue_final_message:
            raise ValueError("continue_final_message: only for chat inputs that end with an assistant message")
        question = inputs.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question: missing or empty; ask a non-empty question about the protein")
        unknown = set(inputs) - {"question", *PROTEIN_KEYS}
        if unknown:
            raise ValueError(
                f"unknown input keys {sorted(unknown)}; use question, {', '.join(PROTEIN_KEYS)} (from a "
                "datasets.Dataset: keep these columns with select_columns, or pass KeyDataset(dataset, column) for a "
                "column of chats)"
            )
        protein_fields = {k: inputs[k] for k in PROTEIN_KEYS if inputs.get(k) is not None}
        if "chain" in protein_fields and "structure" not in protein_fields:
            raise ValueError("chain: given without a structure file; add 'structure': path")
        if not protein_fields:
            raise ValueError("no protein given: add 'sequence', 'structure' (a PDB/mmCIF file) or 'coords'")
        protein = _plain_protein(protein_fields, "protein")
        tag = self.processor.protein_token
        tags = question.count(tag)
        if tags > 1:
            raise ValueError(f"question: {tags} `{tag}` tags but one protein; keep one `{tag}` or none")
        content = question if tags else f"{tag}\n{question}"
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return {"request": {"prompt": prompt, "proteins": [protein], "input": question, "continue": False}}

    def _chat_request(self, chat: object, continue_final_message: bool | None) -> dict:
        messages = list(chat.messages if isinstance(chat, Chat) else chat)
        flat, items = split_protein_items(messages)
        if continue_final_message is None:  # as transformers: a chat ending with the assistant is a prefill
            continue_final_message = flat[-1]["role"] == "assistant"
        tag = self.processor.protein_token
        tags = sum(message["content"].count(tag) for message in flat)
        if tags != len(items):
            raise ValueError(
                f"conversation: {tags} `{tag}` tags but {len(items)} protein items; give each protein as a "
                "{'type': 'protein', 'sequence' | 'structure' | 'coords': ...} item in the message content"
            )
        proteins = [_plain_protein(item, f"conversation protein {i}") for i, item in enumerate(items)]
        prompt = self.processor.apply_chat_template(
            flat, add_generation_prompt=not continue_final_message, continue_final_message=continue_final_message
        )
        return {"prompt": prompt, "proteins": proteins, "input": messages, "continue": continue_final_message}

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        # Requests are tokenised together in `_forward` (the processor pads proteins per batch), so a batch is just
        # the list of preprocessed requests. Inputs without a length (generators) are streamed, as in the base class.
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            num_workers = min(num_workers, 1)
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_merge_requests)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs: dict, processor_kwargs: dict | None = None, **generate_kwargs) -> dict[str, Any]:
        requests = model_inputs["request"]
        if isinstance(requests, dict):  # a single input, not batched by `get_iterator`
            requests = [requests]
        prompts = [request["prompt"] for request in requests]
        settings = {"padding": True, **(processor_kwargs or {}), "padding_side": "left", "return_tensors": "pt"}
        bos = self.processor.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):  # as ProcessorMixin.apply_chat_template tokenises
            settings["add_special_tokens"] = False
        batch = self.processor(text=prompts, proteins=[request["proteins"] for request in requests], **settings)
        batch = batch.to(self.device)
        settings = self._prepare_generate_kwargs(generate_kwargs, return_dict_in_generate=False)
        output = self.model.generate(**batch, **settings)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        # generate returns num_return_sequences rows per input, input by input: group them by input.
        return {
            "generated": new_tokens.reshape(len(requests), -1, new_tokens.shape[-1]),
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "request": requests,
        }

    def postprocess(
        self,
        model_outputs: dict,
        return_type: ReturnType = ReturnType.FULL_TEXT,
        clean_up_tokenization_spaces: bool | None = None,
        skip_special_tokens: bool = True,
    ) -> list[dict[str, Any]]:
        request = model_outputs["request"]
        request = request[0] if isinstance(request, list) else request
        records = []
        for tokens in model_outputs["generated"][0]:
            if return_type == ReturnType.TENSORS:
                prompt = model_outputs["input_ids"][0][model_outputs["attention_mask"][0].bool()]
                records.append({"generated_token_ids": torch.cat([prompt, tokens]).tolist()})
                continue
            text = self.processor.tokenizer.decode(
                tokens,
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            )
            generated = text
            if return_type == ReturnType.FULL_TEXT:
                generated = _full_text(request, text)
            records.append({"answer": text.strip(), "generated_text": generated})
        return records


class _Rows(TorchDataset):
    """A dataset's rows one at a time, for the DataLoader to index: nothing is materialised."""

    def __init__(self, rows: Any):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


def _processor_or_explain(model: Any) -> SepitProcessor:
    """The processor saved with the model, or a ValueError naming the missing files and how to add them (transformers'
    own error is a tokenizer backend failure that does not say a processor is missing)."""
    folder = str(getattr(model, "name_or_path", "") or "")
    how = (
        "save the processor the model was trained with next to it (processor.save_pretrained(folder), e.g. "
        "SepitProcessor.from_pretrained_parts(esm, llm)), or pass processor= to pipeline()"
    )
    if not folder:
        raise ValueError(f"protein-qa needs the SEPIT processor and the model names no folder to load it from: {how}")
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name)) for name in PROCESSOR_FILES):
        raise ValueError(
            f"{folder} has no SEPIT processor ({', '.join(PROCESSOR_FILES)} and protein_tokenizer/ are missing): {how}"
        )
    try:  # present but not loaded by AutoProcessor: load it here to show why
        return SepitProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}: the SEPIT processor could not be loaded ({error}); {how}") from error


def _check_max_new_tokens(generate_kwargs: dict) -> None:
    """The bound holds for the caller's values: directly, in generate_kwargs or in a passed generation_config."""
    config = generate_kwargs.get("generation_config")
    for limit in (generate_kwargs.get("max_new_tokens"), getattr(config, "max_new_tokens", None)):
        if limit is not None and (
            isinstance(limit, bool) or not (isinstance(limit, int) and 0 < limit <= MAX_NEW_TOKENS_LIMIT)
        ):
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {limit!r}")


def _plain_protein(fields: object, where: str) -> dict:
    """A protein loaded (structure files read and aligned) as plain data: under remote code the pipeline and the
    processor modules may be separate copies, whose ProteinInput classes differ."""
    loaded = to_protein_input(fields, where)
    protein = {"sequence": loaded.sequence}
    if loaded.coords is not None:
        protein.update(coords=loaded.coords, coords_mask=loaded.coords_mask)
    return protein


def _full_text(request: dict, text: str) -> str | list[dict]:
    """As text-generation's full text: the prompt followed by the generated text, or the chat with a new assistant
    message (or, when continuing, the last message extended)."""
    prompt = request["input"]
    if isinstance(prompt, str):
        return prompt + text
    if not request["continue"]:
        return [*prompt, {"role": "assistant", "content": text}]
    last = dict(prompt[-1])
    content = last["content"]
    if isinstance(content, str):
        last["content"] = content + text
    elif content and content[-1].get("type") == "text":
        last["content"] = [*content[:-1], {**content[-1], "text": content[-1]["text"] + text}]
    else:
        last["content"] = [*content, {"type": "text", "text": text}]
    return [*prompt[:-1], last]


def _merge_requests(items: list[dict]) -> dict[str, list]:
    return {"request": [item["request"] for item in items]}


__all__ = ["ProteinQuestionAnsweringPipeline"]
