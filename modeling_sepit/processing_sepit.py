"""SepitProcessor: the LLM tokenizer, the ESM tokenizer and the chat template, from questions and proteins (sequences,
coordinates or structure files) to the tensors `SepitForConditionalGeneration` takes."""

import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AddedToken, BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging
from transformers.utils.chat_template_utils import render_jinja_template

from .structure_loading import ProteinStructure, align_structure_to_sequence, check_sequence, load_structure

logger = logging.get_logger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful biological assistant. You are able to understand the protein that the user provides, and "
    "assist the user with a variety of tasks using natural language."
)
# The original SEPIT prompt: Llama-2 `[INST]` turns with its system prompt; `{% generation %}` marks what is trained on.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = default_system -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{ bos_token }}{%- endif -%}"
    "[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{%- elif message['role'] == 'assistant' -%}"
    "{% generation %} {{ message['content'] }} {{ eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


@dataclass
class ProteinInput:
    """One protein, normalised: sequence and, when known, C-alpha coordinates with a presence mask."""

    sequence: str
    coords: np.ndarray | None = None
    coords_mask: np.ndarray | None = None


def _check_coords(coords: object, mask: object, length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        coords = np.asarray(coords, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: coords must be numbers of shape (L, 3) ({error})") from error
    if coords.shape != (length, 3):
        raise ValueError(
            f"{where}: coords have shape {coords.shape}; they must be (L, 3) = ({length}, 3), one C-alpha per residue"
        )
    finite = np.isfinite(coords).all(-1)
    if mask is None:
        mask = finite
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (length,):
            raise ValueError(f"{where}: coords_mask has shape {mask.shape}; it must be ({length},)")
        bad = np.flatnonzero(mask & ~finite)
        if bad.size:
            raise ValueError(
                f"{where}: coords have NaN/inf at residues {bad[:5].tolist()} where coords_mask says present; "
                "set coords_mask False there"
            )
    return np.where(mask[:, None], coords, 0.0).astype(np.float32), mask


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


class SepitProcessor(ProcessorMixin):
    r"""
    Builds SEPIT inputs. Each `<protein>` in the text is expanded into one placeholder per feature position of its
    protein (`<cls>`, residues, `<eos>`), or per group of `protein_pooling` positions, so `input_ids` have their final
    length.

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
        self.protein_token = "<protein>"
        if tokenizer is not None and tokenizer.convert_tokens_to_ids(self.protein_token) in (
            None,
            tokenizer.unk_token_id,
        ):
            tokenizer.add_tokens([AddedToken(self.protein_token, normalized=False, special=True)], special_tokens=True)
        self.max_protein_length = max_protein_length
        self.original_compat = original_compat
        self.protein_padding_length = protein_padding_length
        self.protein_pooling = protein_pooling
        if not isinstance(max_protein_length, int) or max_protein_length < 1:
            raise ValueError(f"max_protein_length must be an integer >= 1 (residues kept), got {max_protein_length!r}")
        if protein_pooling < 1:
            raise ValueError(f"protein_pooling must be >= 1 (1: one placeholder per position), got {protein_pooling}")
        if original_compat and protein_pooling != 1:
            raise ValueError(
                f"protein_pooling={protein_pooling} needs original_compat=False: converted original checkpoints take "
                "one placeholder per padded position"
            )
        if protein_padding_length is not None and protein_padding_length < max_protein_length + 2:
            raise ValueError(
                f"protein_padding_length={protein_padding_length} must hold max_protein_length + 2 = "
                f"{max_protein_length + 2} positions (residues plus <cls> and <eos>)"
            )
        super().__init__(tokenizer, protein_tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

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

    def _protein_tensors(self, proteins: list[ProteinInput]) -> dict[str, torch.Tensor]:
        padding = {"padding": True}
        if self.protein_padding_length is not None:
            padding = {"padding": "max_length", "max_length": self.protein_padding_length}
        encoded = self.protein_tokenizer(
            [p.sequence for p in proteins], add_special_tokens=True, return_tensors="pt", **padding
        )
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        tensors = {"protein_input_ids": ids, "protein_attention_mask": mask}
        if any(p.coords is not None for p in proteins):
            coords = torch.zeros((*ids.shape, 3))
            coords_mask = torch.zeros(ids.shape, dtype=torch.bool)
            for i, protein in enumerate(proteins):
                if protein.coords is not None:
                    # Position 0 is <cls>: residues sit at 1..L.
                    coords[i, 1 : 1 + len(protein.sequence)] = torch.from_numpy(protein.coords)
                    coords_mask[i, 1 : 1 + len(protein.sequence)] = torch.from_numpy(protein.coords_mask)
            tensors.update(protein_coords=coords, protein_coords_mask=coords_mask)
        return tensors

    def __call__(
        self,
        text: str | list[str] | None = None,
        proteins: object = None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
        assistant_spans: list[list[tuple[int, int]]] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (with `<protein>` tags) and `proteins`. With `assistant_spans` (character spans per text,
        as `apply_chat_template` computes them) `labels` cover those spans only."""
        if text is None or (isinstance(text, list) and not text):
            raise ValueError("text: no question given; pass a string (or list of strings) with `<protein>` tags")
        if not isinstance(text, str | list | tuple):
            raise ValueError(f"text: got {type(text).__name__}; pass a string (or list of strings) with <protein> tags")
        texts = [text] if isinstance(text, str) else list(text)
        for i, item in enumerate(texts):
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"text[{i}]: empty question or not a string; give the question as a non-empty string")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: SEPIT returns PyTorch tensors only ('pt')")
        padding_side = padding_side or self.tokenizer.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' (generation) or 'right' (training), got {padding_side!r}")
        groups = self._proteins_per_text(texts, proteins)
        flat = [protein for group in groups for protein in group]
        protein_tensors = self._protein_tensors(flat) if flat else {}
        if flat and self.original_compat:
            widths = [protein_tensors["protein_input_ids"].shape[1]] * len(flat)
        elif flat:
            positions = protein_tensors["protein_attention_mask"].sum(-1)
            widths = (-(-positions // self.protein_pooling)).tolist()  # ceil(n / k), as the model pools

        encoded = self.tokenizer(
            texts, add_special_tokens=True, return_offsets_mapping=assistant_spans is not None, **kwargs
        )
        protein_id = self.protein_token_id
        rows, width_iter = [], iter(widths if flat else [])
        for i, ids in enumerate(encoded["input_ids"]):
            labels = [-100] * len(ids)
            if assistant_spans is not None:
                for t, (start, end) in enumerate(encoded["offset_mapping"][i]):
                    if end > start and any(s <= start and end <= e for s, e in assistant_spans[i]):
                        labels[t] = ids[t]
            row_ids, row_labels = [], []
            for token, label in zip(ids, labels, strict=True):
                repeat = next(width_iter) if token == protein_id else 1
                row_ids += [token] * repeat
                row_labels += [label if token != protein_id else -100] * repeat
            rows.append((row_ids, row_labels))

        longest = max(len(ids) for ids, _ in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), longest), pad_id)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), -100)
        for i, (ids, row_labels) in enumerate(rows):
            span = slice(longest - len(ids), longest) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention_mask[i, span] = 1
            labels[i, span] = torch.tensor(row_labels)
        data = {"input_ids": input_ids, "attention_mask": attention_mask, **protein_tensors}
        if assistant_spans is not None:
            data["labels"] = labels
        return BatchFeature(data)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        proteins: object = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ) -> BatchFeature | str | list[str]:
        """Render chat messages (contents may hold `<protein>` tags) and tokenise them with `proteins`. Without a
        generation prompt, `labels` cover the assistant turns only; with one, padding is on the left."""
        batched = bool(conversation) and isinstance(conversation[0], list)
        conversations = conversation if batched else [conversation]
        for i, chat in enumerate(conversations):
            if not chat or not all(isinstance(m, dict) and "role" in m and "content" in m for m in chat):
                raise ValueError(f"conversation[{i}]: give a non-empty list of {{'role', 'content'}} messages")
            for j, message in enumerate(chat):
                content = message["content"]
                if not isinstance(content, str) or (message["role"] == "user" and not content.strip()):
                    raise ValueError(
                        f"conversation[{i}][{j}]: {message['role']} content must be a string, non-empty for a user "
                        "question"
                    )
        template = chat_template or self.chat_template
        if not add_generation_prompt and tokenize and not GENERATION_TAG.search(template):
            raise ValueError(
                "chat_template: training inputs need `{% generation %}` ... `{% endgeneration %}` around assistant "
                "replies to place labels; this template has none (use the default template or add the tags)"
            )
        rendered, spans = render_jinja_template(
            conversations,
            chat_template=template,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            default_system=DEFAULT_SYSTEM_PROMPT,
        )
        if not tokenize:
            return rendered if batched else rendered[0]
        if proteins is not None and not batched:
            proteins = [proteins if isinstance(proteins, list) else [proteins]]
        kwargs.setdefault("padding_side", "left" if add_generation_prompt else "right")
        return self(
            text=rendered, proteins=proteins, assistant_spans=None if add_generation_prompt else spans, **kwargs
        )

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

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
    """Training batches from examples `{"messages": [...], "proteins": [...]}` (or dataset rows with `messages`,
    `sequence`, `coords`, `coords_mask`): right-padded, labels on assistant turns, and each protein's structure dropped
    with probability `structure_dropout` (SEPIT stage 1: 0.15)."""

    def __init__(self, processor: SepitProcessor, structure_dropout: float = 0.15, seed: int | None = None):
        if not 0.0 <= structure_dropout <= 1.0:
            raise ValueError(f"structure_dropout must be in [0, 1], got {structure_dropout}")
        self.processor = processor
        self.structure_dropout = structure_dropout
        self.seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**32)

    def _maybe_drop(self, protein: object, key: str) -> object:
        """Drop decided by (seed, example, protein) alone, not by a running generator, so a resumed run (whose skipped
        batches never reach the collator) drops exactly what an uninterrupted one would."""
        protein = to_protein_input(protein)
        if protein.coords is None:
            return protein
        if np.random.default_rng([self.seed, zlib.crc32(key.encode())]).random() < self.structure_dropout:
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
        conversations = [example["messages"] for example in examples]
        proteins = [
            [self._maybe_drop(p, f"{i}:{example['messages']}") for i, p in enumerate(self._proteins(example))]
            for example in examples
        ]
        return self.processor.apply_chat_template(conversations, proteins=proteins, padding_side="right")


__all__ = ["ProteinInput", "SepitDataCollator", "SepitProcessor", "to_protein_input"]
