"""SepitProcessor: the LLM tokenizer, the ESM tokenizer and the chat template, from questions and proteins (sequences,
coordinates or structure files) to the tensors `SepitForConditionalGeneration` takes."""

import dataclasses
import numbers
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
import numpy as np
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin, TextKwargs
from transformers.utils import logging

from .configuration_sepit import PROTEIN_TOKEN, add_protein_token
from .structure_loading import ProteinStructure, align_structure_to_sequence, check_sequence, load_structure

logger = logging.get_logger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful biological assistant. You are able to understand the protein that the user provides, and "
    "assist the user with a variety of tasks using natural language."
)
# The original SEPIT prompt: Llama-2 `[INST]` turns with its system prompt (`default_system=` replaces it, a leading
# system message too); `{% generation %}` marks what is trained on. Roles it cannot place are errors, not dropped.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- elif default_system is defined -%}{%- set system = default_system -%}"
    "{%- else -%}{%- set system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ raise_exception('a system message can only come first: the Llama-2 prompt has one system prompt') }}"
    "{%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user/assistant/user/..., starting with user (after an optional "
    "system message)') }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{ bos_token }}{%- endif -%}"
    "[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{%- elif message['role'] == 'assistant' -%}"
    "{% generation %} {{ message['content'] }} {{ eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('role ' + message['role'] + ' is not one this template places (system, user, assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
CHAT_ROLES = ("system", "user", "assistant", "tool")
# A template written for transformers' typed contents (lists of {"type": ...} items) tests a content's type or reads
# its items' fields (item['type'], item.text, selectattr('type', ...)); the others render contents as strings.
TYPED_CONTENT_TEMPLATE = re.compile(
    r"\bis\s+(not\s+)?string\b|\[\s*['\"](type|text)['\"]\s*\]|\.(type|text)\b|selectattr\(\s*['\"]type"
)
# Tokenizer arguments that would split, pair or re-tokenise the texts, so that the proteins could no longer be placed.
REFUSED_TEXT_KWARGS = (
    "text_pair",
    "text_target",
    "text_pair_target",
    "is_split_into_words",
    "return_overflowing_tokens",
    "stride",
    "sanitize_control_tokens",
    "return_mm_token_type_ids",
)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


@dataclass
class ProteinInput:
    """One protein, normalised: sequence and, when known, C-alpha coordinates with a presence mask."""

    sequence: str
    coords: np.ndarray | None = None
    coords_mask: np.ndarray | None = None


def _real_numbers(value: object, where: str) -> np.ndarray:
    """Coordinates as an array of real numbers (ints or floats). Booleans, complex numbers, strings, None and dates
    are refused, never cast: `np.asarray(..., dtype=float32)` would read "1.5" as 1.5, drop an imaginary part and
    turn None into NaN (an absent residue)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{where}: coords must be numbers of shape (L, 3) ({error})") from error
    if array.dtype.kind in "iuf":
        return array
    if array.dtype.kind == "O":
        odd = [item for item in array.flat if isinstance(item, bool) or not isinstance(item, numbers.Real)]
        if not odd:
            return array.astype(np.float64)
        found = type(odd[0]).__name__
    else:
        found = f"dtype {array.dtype}"
    raise ValueError(
        f"{where}: coords must be numbers (real ints or floats), got {found}; for a residue without coordinates give "
        "NaN, or set its coords_mask False"
    )


def _presence_mask(value: object, where: str) -> np.ndarray:
    """A coords_mask as booleans: bools, or numbers that are 0 or 1. Strings are refused (`bool("False")` is True)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{where}: coords_mask must be an array of booleans ({error})") from error
    if array.dtype.kind == "b":
        return array
    numeric = array.dtype.kind in "iuf" or (
        array.dtype.kind == "O" and all(isinstance(item, numbers.Real) for item in array.flat)
    )
    if numeric and np.isin(array.astype(np.float64), (0, 1)).all():
        return array.astype(bool)
    shown = array.flat[0] if array.size else None
    raise ValueError(
        f"{where}: coords_mask must be booleans (True/False, or 0/1), got dtype {array.dtype} (first value {shown!r})"
    )


def _check_coords(coords: object, mask: object, length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates as float32 (L, 3) and their presence mask: NaN/inf mark absent residues when no mask is given."""
    coords = _real_numbers(coords, where)
    if coords.shape != (length, 3):
        raise ValueError(
            f"{where}: coords have shape {coords.shape}; they must be (L, 3) = ({length}, 3), one C-alpha per residue"
        )
    with np.errstate(over="ignore"):
        narrowed = coords.astype(np.float32)
    overflow = np.flatnonzero((np.isfinite(coords) & ~np.isfinite(narrowed)).any(-1))
    if overflow.size:
        raise ValueError(
            f"{where}: coords at residues {overflow[:5].tolist()} exceed float32's range (~3.4e38); give C-alpha "
            "coordinates in angstroms"
        )
    finite = np.isfinite(narrowed).all(-1)
    if mask is None:
        mask = finite
    else:
        mask = _presence_mask(mask, where)
        if mask.shape != (length,):
            raise ValueError(f"{where}: coords_mask has shape {mask.shape}; it must be ({length},)")
        bad = np.flatnonzero(mask & ~finite)
        if bad.size:
            raise ValueError(
                f"{where}: coords have NaN/inf at residues {bad[:5].tolist()} where coords_mask says present; "
                "set coords_mask False there"
            )
    return np.where(mask[:, None], narrowed, 0.0).astype(np.float32), mask


def _is_structure_path(value: object) -> bool:
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and (value.lower().endswith(STRUCTURE_SUFFIXES) or os.sep in value)


def to_protein_input(protein: object, where: str = "protein") -> ProteinInput:
    """Accepts a sequence, a structure file path, `(path, chain)`, a `ProteinStructure`, or a dict with `sequence`,
    `coords` (+ `coords_mask`, `plddt`) or `structure` (+ `chain`, optional full `sequence` to align to)."""
    if isinstance(protein, ProteinInput):
        return protein
    if isinstance(protein, ProteinStructure):
        return ProteinInput(protein.sequence, *_check_coords(protein.coords, None, len(protein.sequence), where))
    if isinstance(protein, tuple) and len(protein) == 2 and _is_structure_path(protein[0]):
        return to_protein_input({"structure": protein[0], "chain": protein[1]}, where)
    if _is_structure_path(protein):
        return to_protein_input(load_structure(protein), where)
    if isinstance(protein, str):
        return ProteinInput(check_sequence(protein, where))
    if isinstance(protein, dict):
        unknown = set(protein) - {"sequence", "coords", "coords_mask", "plddt", "structure", "chain"}
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown)}; use sequence, coords, coords_mask, structure, chain"
            )
        if protein.get("structure") is not None:
            structure = protein["structure"]
            if not isinstance(structure, ProteinStructure):
                structure = load_structure(structure, chain=protein.get("chain"))
            if protein.get("sequence") is None:
                return to_protein_input(structure, where)
            sequence = check_sequence(protein["sequence"], where)
            coords, mask = align_structure_to_sequence(structure, sequence)
            return ProteinInput(sequence, *_check_coords(coords, mask, len(sequence), where))
        sequence = check_sequence(protein.get("sequence"), where)
        if protein.get("coords") is None:
            if protein.get("coords_mask") is not None:
                raise ValueError(f"{where}: coords_mask given without coords")
            return ProteinInput(sequence)
        return ProteinInput(
            sequence, *_check_coords(protein["coords"], protein.get("coords_mask"), len(sequence), where)
        )
    raise ValueError(
        f"{where}: cannot read a protein from {type(protein).__name__}; give a sequence string, a structure file "
        "path, (path, chain), a ProteinStructure or a dict with 'sequence'/'coords' or 'structure'/'chain'"
    )


def _message_dict(message: object) -> object:
    """A chat message as a dict: transformers also takes message objects (dataclasses, pydantic models)."""
    if isinstance(message, dict):
        return message
    if hasattr(message, "model_dump"):
        return message.model_dump()
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return dataclasses.asdict(message)
    return message


def split_protein_items(
    conversation: object, where: str = "conversation", flatten: bool = True
) -> tuple[list[dict], list[dict]]:
    """Chat messages whose protein items became `<protein>` tags, and the proteins those items held, in order.

    A content is a string (with `<protein>` tags where proteins go) or, as in transformers' multimodal chats, a list
    of items `{"type": "text", "text": ...}` and `{"type": "protein", "sequence" | "structure" (+ "chain") |
    "coords" (+ "coords_mask"): ...}`. With `flatten` (for templates that render string contents only, as the
    default one and most LLMs' do) the items are joined with single spaces; otherwise a content stays a list, each
    protein item becoming `{"type": "text", "text": "<protein>"}`, for templates written for typed contents. Keys
    holding None are ignored (a `datasets` column of items stores every key of every item type)."""
    if not isinstance(conversation, list | tuple) or not conversation:
        raise ValueError(f"{where}: give a non-empty list of {{'role', 'content'}} messages")
    messages, proteins = [], []
    for j, message in enumerate(conversation):
        message = _message_dict(message)
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}[{j}]: a message is a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}[{j}].role={role!r} is not a chat role; use one of {', '.join(CHAT_ROLES)}")
        if isinstance(content, list | tuple):
            items = []
            for k, item in enumerate(content):
                item = {
                    key: value for key, value in (item.items() if isinstance(item, dict) else ()) if value is not None
                }
                kind = item.pop("type", None)
                if kind == "text" and isinstance(item.get("text"), str):
                    items.append({**item, "type": "text"})
                elif kind == "protein":
                    proteins.append(item)
                    items.append({"type": "text", "text": PROTEIN_TOKEN})
                else:
                    raise ValueError(
                        f"{where}[{j}].content[{k}]: items are {{'type': 'text', 'text': str}} or {{'type': 'protein', "
                        f"'sequence' | 'structure' | 'coords': ...}}, got type {kind!r} (a protein model reads no "
                        "images, video or audio)"
                    )
            text = " ".join(item["text"] for item in items)
            if not flatten and (text.strip() or role != "user"):
                messages.append({**message, "content": items})
                continue
            content = text
        if not isinstance(content, str) or (role == "user" and not content.strip()):
            raise ValueError(
                f"{where}[{j}]: {role} content must be a string or a list of text/protein items, non-empty for a user "
                "question"
            )
        messages.append({**message, "content": content})
    return messages, proteins


class SepitProcessor(ProcessorMixin):
    r"""
    Builds SEPIT inputs as transformers' multimodal processors do (LLaVA's `<image>`): each `<protein>` tag in the text
    is expanded to one placeholder per feature position of its protein (`<cls>`, residues, `<eos>`), or per group of
    `protein_pooling` positions, and the expanded text is then tokenised by the LLM tokenizer with the caller's
    arguments, so `padding`, `truncation`, `max_length`, `pad_to_multiple_of`, `padding_side`, `add_special_tokens` and
    `return_tensors` mean exactly what they mean for the tokenizer. Truncation that would cut into (or drop) a
    protein's placeholders is refused with a ValueError.

    Args:
        tokenizer: the LLM tokenizer (gets the `<protein>` token if it lacks it).
        protein_tokenizer: the ESM-2 tokenizer (saved to `protein_tokenizer/`).
        chat_template: Jinja template; by default the original SEPIT Llama-2 `[INST]` prompt with its system prompt.
        max_protein_length: residues kept per protein (longer ones are truncated, sequence and coordinates together).
        original_compat: expand every `<protein>` to the padded protein width, as converted original checkpoints
            expect (all proteins of a batch are padded to a common width).
        protein_padding_length: pad every protein to this many positions (the original release padded to 1024);
            `None` pads to the longest protein of the batch.
        protein_pooling: k, as in the model's config: a protein of n feature positions gets ceil(n / k) placeholders.
    """

    def __init__(
        self,
        tokenizer=None,
        protein_tokenizer=None,
        chat_template: str | None = None,
        max_protein_length: int = 1022,
        original_compat: bool = False,
        protein_padding_length: int | None = None,
        protein_pooling: int = 1,
        **kwargs,
    ):
        self.protein_token = PROTEIN_TOKEN
        if tokenizer is not None:
            add_protein_token(tokenizer)
        self.max_protein_length = max_protein_length
        self.original_compat = original_compat
        self.protein_padding_length = protein_padding_length
        self.protein_pooling = protein_pooling
        self._check_settings()
        if not (
            chat_template is None
            or isinstance(chat_template, dict)
            or (isinstance(chat_template, str) and chat_template.strip())
        ):
            raise ValueError(
                "chat_template must be a Jinja template string, a dict of named templates, or None (the default SEPIT "
                f"prompt), got {chat_template!r}"
            )
        super().__init__(tokenizer, protein_tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    def _check_settings(self) -> None:
        """The settings' types and ranges, at construction and again per call (training scripts assign them): a
        `True` would silently mean 1, and `"false"` would be true."""
        for name in ("max_protein_length", "protein_pooling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (a Python int), got {value!r}")
        if not isinstance(self.original_compat, bool | np.bool_):
            raise ValueError(f"original_compat must be True or False, got {self.original_compat!r}")
        if self.original_compat and self.protein_pooling != 1:
            raise ValueError(
                f"protein_pooling={self.protein_pooling} needs original_compat=False: converted original checkpoints "
                "take one placeholder per padded position"
            )
        padding = self.protein_padding_length
        if padding is not None and (
            isinstance(padding, bool) or not isinstance(padding, int) or padding < self.max_protein_length + 2
        ):
            raise ValueError(
                f"protein_padding_length={padding!r} must be None or an integer holding max_protein_length + 2 = "
                f"{self.max_protein_length + 2} positions (residues plus <cls> and <eos>)"
            )

    @property
    def protein_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.protein_token)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "protein_input_ids",
            "protein_attention_mask",
            "protein_coords",
            "protein_coords_mask",
        ]

    def _proteins_per_text(self, texts: list[str], proteins: object) -> list[list[ProteinInput]]:
        """Group proteins by text: a list per text, or a flat list consumed in order of the `<protein>` tags."""
        counts = [text.count(self.protein_token) for text in texts]
        if proteins is None:
            proteins = []
        elif not isinstance(proteins, list) or (proteins and isinstance(proteins[0], (int, float))):
            proteins = [proteins]
        nested = len(proteins) == len(texts) and all(isinstance(group, list) for group in proteins)
        if not nested:
            if len(proteins) != sum(counts):
                raise ValueError(
                    f"text: the texts hold {sum(counts)} `<protein>` tags but {len(proteins)} proteins were given; "
                    "put one `<protein>` where each protein goes"
                )
            groups, start = [], 0
            for count in counts:
                groups.append(proteins[start : start + count])
                start += count
            proteins = groups
        result = []
        for i, (count, group) in enumerate(zip(counts, proteins, strict=True)):
            if len(group) != count:
                raise ValueError(
                    f"text[{i}]: {count} `<protein>` tags but {len(group)} proteins; give one protein per tag"
                )
            result.append([self._truncate(to_protein_input(p, f"proteins[{i}][{j}]")) for j, p in enumerate(group)])
        return result

    def _truncate(self, protein: ProteinInput) -> ProteinInput:
        limit = self.max_protein_length
        if len(protein.sequence) <= limit:
            return protein
        # Once per process: an evaluation over a long-protein benchmark would otherwise repeat it for every question.
        logger.warning_once(f"proteins longer than max_protein_length={limit} residues are truncated to it")
        cut = slice(0, limit)
        if protein.coords is None:
            return ProteinInput(protein.sequence[cut])
        return ProteinInput(protein.sequence[cut], protein.coords[cut], protein.coords_mask[cut])

    def _protein_arrays(self, proteins: list[ProteinInput]) -> dict[str, np.ndarray]:
        padding = {"padding": True}
        if self.protein_padding_length is not None:
            padding = {"padding": "max_length", "max_length": self.protein_padding_length}
        encoded = self.protein_tokenizer(
            [p.sequence for p in proteins], add_special_tokens=True, return_tensors="np", **padding
        )
        ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
        arrays = {"protein_input_ids": ids, "protein_attention_mask": mask}
        if any(p.coords is not None for p in proteins):
            coords = np.zeros((*ids.shape, 3), dtype=np.float32)
            coords_mask = np.zeros(ids.shape, dtype=bool)
            for i, protein in enumerate(proteins):
                if protein.coords is not None:
                    # Position 0 is <cls>: residues sit at 1..L.
                    coords[i, 1 : 1 + len(protein.sequence)] = protein.coords
                    coords_mask[i, 1 : 1 + len(protein.sequence)] = protein.coords_mask
            arrays.update(protein_coords=coords, protein_coords_mask=coords_mask)
        return arrays

    def _expand_tags(self, texts: list[str], widths: list[int]) -> tuple[list[str], list[list[dict]]]:
        """Each `<protein>` repeated once per placeholder of its protein, and where each tag went (transformers'
        `text_replacement_offsets`, which `apply_chat_template` uses to place assistant masks)."""
        tag, counts = self.protein_token, iter(widths)
        expanded, offsets = [], []
        for text in texts:
            pieces, replacements, last, gained = [], [], 0, 0
            for match in re.finditer(re.escape(tag), text):
                start, end = match.span()
                replacement = tag * next(counts)
                pieces += [text[last:start], replacement]
                new_start = start + gained
                replacements.append(
                    {
                        "type": "protein",
                        "span": (start, end),
                        "new_span": (new_start, new_start + len(replacement)),
                        "text": tag,
                        "replacement": replacement,
                    }
                )
                gained += len(replacement) - len(tag)
                last = end
            expanded.append("".join([*pieces, text[last:]]))
            offsets.append(replacements)
        return expanded, offsets

    def __call__(
        self,
        text: str | list[str] | None = None,
        proteins: object = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (with `<protein>` tags) and `proteins` (one per tag: a list per text, or a flat list in tag
        order). Tokenizer arguments, flat or as `text_kwargs={...}`, are applied to the expanded text. Returns
        `input_ids`, `attention_mask` and the protein tensors (`return_tensors`: "pt" by default, "np", or None)."""
        for name in ("images", "videos", "audio"):  # None from ProcessorMixin.apply_chat_template
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"{name}: SEPIT reads proteins (sequence, structure file or coordinates), not {name}")
        if text is None or (isinstance(text, list | tuple) and not text):
            raise ValueError("text: no question given; pass a string (or list of strings) with `<protein>` tags")
        if not isinstance(text, str | list | tuple):
            raise ValueError(f"text: got {type(text).__name__}; pass a string (or list of strings) with <protein> tags")
        texts = [text] if isinstance(text, str) else list(text)
        for i, item in enumerate(texts):
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"text[{i}]: empty question or not a string; give the question as a non-empty string")
        allowed = {*TextKwargs.__annotations__, "text_kwargs", "common_kwargs", "return_text_replacement_offsets"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"{unknown}: not arguments of SepitProcessor; it takes text, proteins and the LLM tokenizer's "
                "arguments (padding, truncation, max_length, pad_to_multiple_of, padding_side, add_special_tokens, "
                "return_tensors, ...)"
            )
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]
        if text_kwargs.get("padding_side") not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {text_kwargs['padding_side']!r}")
        refused = [name for name in REFUSED_TEXT_KWARGS if text_kwargs.get(name) not in (None, False)]
        if refused:
            raise ValueError(f"{refused}: not supported by SepitProcessor (each text must stay one sequence)")
        return_offsets = bool(text_kwargs.pop("return_text_replacement_offsets", None))
        return_offsets = return_offsets or bool(merged.get("return_text_replacement_offsets"))
        return_tensors = text_kwargs.pop("return_tensors", "pt")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors={return_tensors!r}: SEPIT returns 'pt' (default), 'np' or None (lists)")

        self._check_settings()
        groups = self._proteins_per_text(texts, proteins)
        flat = [protein for group in groups for protein in group]
        arrays = self._protein_arrays(flat) if flat else {}
        if flat and self.original_compat:
            widths = [arrays["protein_input_ids"].shape[1]] * len(flat)
        else:
            positions = arrays["protein_attention_mask"].sum(-1) if flat else np.zeros(0, dtype=np.int64)
            widths = (-(-positions // self.protein_pooling)).tolist()  # ceil(n / k), as the model pools
        expanded, offsets = self._expand_tags(texts, widths)
        encoded = self.tokenizer(expanded, **text_kwargs)
        self._check_placeholders(encoded["input_ids"], groups, widths, text_kwargs)
        data = dict(encoded)
        if return_tensors is None:
            data.update({name: array.tolist() for name, array in arrays.items()})
        else:
            data.update(arrays)
        if return_offsets:
            data["text_replacement_offsets"] = offsets
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _check_placeholders(
        self, input_ids: list[list[int]], groups: list[list[ProteinInput]], widths: list[int], text_kwargs: dict
    ) -> None:
        """Every protein's placeholder run must survive tokenisation whole; truncation that cuts into it is refused
        (the model would get features for positions that are no longer there)."""
        protein_id, start = self.protein_token_id, 0
        for i, (ids, group) in enumerate(zip(input_ids, groups, strict=True)):
            expected = sum(widths[start : start + len(group)])
            start += len(group)
            found = list(ids).count(protein_id)
            if found != expected:
                limit = text_kwargs.get("max_length") or self.tokenizer.model_max_length
                raise ValueError(
                    f"text[{i}]: truncation (max_length={limit}, truncation_side={self.tokenizer.truncation_side!r}) "
                    f"keeps {found} of its {expected} `<protein>` placeholders; raise max_length, shorten the text "
                    "around the proteins, or lower max_protein_length (truncation never cuts a protein)"
                )

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        proteins: object = None,
        **kwargs,
    ) -> BatchFeature | str | list[str] | list[int] | list[list[int]]:
        """transformers' `ProcessorMixin.apply_chat_template` (same arguments and defaults: `tokenize=False`,
        `return_dict=False`, `add_generation_prompt`, `continue_final_message`, `return_assistant_tokens_mask`,
        extra template variables, `processor_kwargs`), for chats whose contents are strings with `<protein>` tags
        (proteins then given as `proteins=`, one per tag) or lists of text and protein items (see
        `split_protein_items`)."""
        batched = isinstance(conversation, list | tuple) and bool(conversation) and isinstance(conversation[0], list)
        conversations = list(conversation) if batched else [conversation]
        template = self._resolve_chat_template(chat_template)
        flatten = not TYPED_CONTENT_TEMPLATE.search(template)  # typed contents only for templates that read them
        flattened, item_proteins = [], []
        for i, chat in enumerate(conversations):
            where = f"conversation[{i}]" if batched else "conversation"
            messages, found = split_protein_items(chat, where, flatten=flatten)
            flattened.append(messages)
            item_proteins.append(found)
        if any(item_proteins):
            if proteins is not None:
                raise ValueError("proteins: given both as protein items in the messages and as proteins=; use one")
            proteins = item_proteins
        elif proteins is not None and not batched:
            proteins = [proteins if isinstance(proteins, list) else [proteins]]
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        if proteins is not None:
            processor_kwargs["proteins"] = proteins
        try:
            return super().apply_chat_template(
                flattened if batched else flattened[0],
                chat_template=chat_template,
                processor_kwargs=processor_kwargs,
                **kwargs,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"conversation: {error}") from error

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As ProcessorMixin's; the `auto_map` that saving with remote code sets on the processor is removed again
        once written (transformers does so for the tokenizers), so saving does not change `to_dict()`."""
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

    def get_data_collator(self, structure_dropout: float = 0.15, seed: int | None = None) -> "SepitDataCollator":
        """The training collator for this processor: reachable from any folder the processor loads from (also with
        `trust_remote_code`), for `Trainer(data_collator=processor.get_data_collator())`."""
        return SepitDataCollator(self, structure_dropout=structure_dropout, seed=seed)

    @classmethod
    def from_pretrained_parts(
        cls, protein_tokenizer_name_or_path: str, text_tokenizer_name_or_path: str, **kwargs
    ) -> "SepitProcessor":
        """A processor from an ESM-2 checkpoint's tokenizer and a causal LM's tokenizer (names or paths)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(text_tokenizer_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        protein_tokenizer = AutoTokenizer.from_pretrained(protein_tokenizer_name_or_path)
        return cls(tokenizer=tokenizer, protein_tokenizer=protein_tokenizer, **kwargs)


class SepitDataCollator:
    """Training batches from examples `{"messages": [...], "proteins": [...]}`, messages with protein items, or dataset
    rows with `messages`, `sequence`, `coords`, `coords_mask`: right-padded, `labels` on assistant turns only (the chat
    template's `{% generation %}` spans), and each protein's structure dropped with probability `structure_dropout`
    (SEPIT stage 1: 0.15), drawn anew at every visit: call `set_epoch` at each epoch (the training scripts do it with
    `training_sepit.StructureDropoutEpochs`), as for a sampler."""

    def __init__(self, processor: SepitProcessor, structure_dropout: float = 0.15, seed: int | None = None):
        if not 0.0 <= structure_dropout <= 1.0:
            raise ValueError(f"structure_dropout must be in [0, 1], got {structure_dropout}")
        template = processor.chat_template if isinstance(processor.chat_template, str) else ""
        if not GENERATION_TAG.search(template):
            raise ValueError(
                "chat_template: training batches need `{% generation %}` ... `{% endgeneration %}` around assistant "
                "replies to place labels; this template has none (use the default template or add the tags)"
            )
        self.processor = processor
        self.structure_dropout = structure_dropout
        self.seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**32)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the structure drops of another visit of the data: decided per (seed, epoch, example, protein), the
        same 15% would otherwise never see their structure in any epoch."""
        self.epoch = int(epoch)

    def _maybe_drop(self, protein: object, key: str) -> object:
        """Drop decided by (seed, epoch, example, protein) alone, not by a running generator, so a resumed run (whose
        skipped batches never reach the collator) drops exactly what an uninterrupted one would."""
        protein = to_protein_input(protein)
        if protein.coords is None:
            return protein
        draw = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())]).random()
        if draw < self.structure_dropout:
            return ProteinInput(protein.sequence)
        return protein

    @staticmethod
    def _proteins(example: dict) -> list:
        """An example's proteins: its `proteins` list, or the one protein of a dataset row's `sequence`, `coords` and
        `coords_mask` columns (the layout of the SEPIT instruction dataset)."""
        if example.get("proteins") is not None:
            return list(example["proteins"])
        if example.get("sequence") is not None:
            return [{key: example.get(key) for key in ("sequence", "coords", "coords_mask")}]
        return []

    def __call__(self, examples: Sequence[dict]) -> BatchFeature:
        conversations, proteins = [], []
        flatten = not TYPED_CONTENT_TEMPLATE.search(self.processor.chat_template)
        for i, example in enumerate(examples):
            messages, items = split_protein_items(example.get("messages"), f"examples[{i}].messages", flatten)
            key = str(example["messages"])
            conversations.append(messages)
            proteins.append([self._maybe_drop(p, f"{k}:{key}") for k, p in enumerate(items or self._proteins(example))])
        batch = self.processor.apply_chat_template(
            conversations,
            proteins=proteins,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors=None,  # lists: transformers places the assistant masks by a Python loop over the offsets
            processor_kwargs={"padding": True, "padding_side": "right"},
        ).convert_to_tensors("pt")
        assistant = batch.pop("assistant_masks").bool() & batch["attention_mask"].bool()
        assistant &= batch["input_ids"] != self.processor.protein_token_id
        empty = (~assistant.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"examples{empty}: no assistant reply to train on (every label would be -100); each training "
                "conversation needs an assistant message with text"
            )
        batch["labels"] = batch["input_ids"].masked_fill(~assistant, -100)
        return batch


__all__ = ["ProteinInput", "SepitDataCollator", "SepitProcessor", "split_protein_items", "to_protein_input"]
