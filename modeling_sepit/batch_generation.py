"""Greedy answers to many questions at once, the one generation loop of the project (`evaluation_sepit` builds each
system's requests and calls it; `training/generate.py` and `training/evaluate.py` go through that).

- Batches are cut from the requests sorted by a caller's key (length, then protein), so a batch pads little and the
  questions about one protein fall together; the batches are the same whatever the number of processes, so every
  answer is the same as in one process.
- Data-parallel: under `accelerate launch` or `torchrun` each process (Accelerate's `PartialState`) answers every
  N-th batch, round-robin rather than `split_between_processes`' contiguous chunks, which on length-sorted batches
  would leave the longest to the last process; the answers are gathered (`gather_object`) back into input order.
- Resumable: with a `shard_dir`, each process appends every finished batch to its own `rank-NNNNN.jsonl` and fsyncs
  it; a rerun skips the batches already answered (in any process's file, whatever the earlier number of processes),
  after cutting a line a kill left half-written. `settings.json` there refuses a rerun with other settings.
- The protein encoder runs once per distinct protein per batch: several questions about one protein share one
  `get_protein_features` pass, given to `generate` as `mm_encoder_outputs`.
- Streamed (`generate_streamed`): a split larger than memory is read as a `datasets` `IterableDataset`, a window of
  rows at a time; windows go round-robin to the processes (`split_dataset_by_node`) and each is sorted and batched
  as above, so its answers do not depend on the number of processes either; the same shards make it resumable.

Also the two record formats of answers: the project's predictions (`predictions.jsonl`, one field per system, which
`training/score.py` reads) and the original SEPIT release's inference output (`{"id", "conversation", "response"}`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .atomic_folder import claim_output_folder
from .cli_sepit import check_dataset
from .modeling_sepit import PROTEIN_INPUT_NAMES
from .pipeline_protein_qa import MAX_NEW_TOKENS_LIMIT
from .processing_sepit import SepitProcessor

# (the user turn as messages, the proteins of its `<protein>` tags): what `generate` is asked, per question.
Request = tuple[list[dict], list]
# The columns a question row needs (the `instructions` config's; `captions` rows hold no question).
QUESTION_COLUMNS = ("accession", "sequence", "type", "question", "answer", "structure_source")
SETTINGS_FILE = "settings.json"
WINDOW_COLUMN = "__window__"  # the number `generate_streamed` gives each window of a stream


# The folder of a run's answered batches, below its output folder (what a rerun resumes from).
SHARDS = "shards"


def start_sharded_run(
    device_name: str, output_dir: Path, writer: str, inputs: Sequence, overwrite: bool
) -> tuple[PartialState, torch.device]:
    """The processes of a resumable generation run joined (accelerate launch / torchrun), each on its device, and the
    output folder claimed by the main process (its shards cleared with `overwrite`) before any process writes one."""
    device = torch.device(device_name)
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes > 1 and device.type == state.device.type:
        device = state.device  # each process its own GPU
    if state.is_main_process:
        claim_output_folder(output_dir, writer, inputs, overwrite)
        if overwrite:
            shutil.rmtree(output_dir / SHARDS, ignore_errors=True)
    state.wait_for_everyone()
    return state, device


def check_generation_settings(max_samples: int | None, batch_size: int, max_new_tokens: int) -> None:
    """The limits every generating command shares, checked before a model loads: at least one question, one per
    batch and one new token, at most the pipeline's token limit."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens}")


def question_rows(
    dataset_name: str, config: str | None, split: str | None, field: str | None = None, streaming: bool = False
) -> Dataset | IterableDataset:
    """The rows of a question split (split "test" of a folder without configs when `config` is None), refused with
    a ValueError naming the argument (`field`; by default `dataset_name`, or `external_benchmarks` without a config)
    when `load_dataset` could not load it or its rows hold no questions. `streaming`: an `IterableDataset` that
    reads the files as it is iterated (for `generate_streamed`), not a table loaded whole."""
    field = field or ("dataset_name" if config else "external_benchmarks")
    check_dataset(dataset_name, config, field)
    dataset = load_dataset(dataset_name, config, split=split, streaming=streaming)
    columns = dataset.column_names if dataset.column_names is not None else list(next(iter(dataset), {}))
    missing = [column for column in QUESTION_COLUMNS if column not in columns]
    if missing:
        raise ValueError(
            f"dataset_config: {config or 'default'} rows of {dataset_name} have no {missing} columns (no questions); "
            "evaluate the 'instructions' config"
        )
    return dataset


def prediction_records(rows: Sequence[dict], answers: dict[str, Sequence[str]]) -> Iterator[dict]:
    """The project's predictions format, one record per row: accession, type, question, reference, then one field
    per system with its answer."""
    for i, row in enumerate(rows):
        record = {"accession": row["accession"], "type": row["type"], "question": row["question"]}
        yield record | {"reference": row["answer"], **{system: answers[system][i] for system in answers}}


def original_records(rows: Sequence[dict], answers: Sequence[str]) -> Iterator[dict]:
    """The original release's inference output, one record per row: `{"id", "conversation": [user, assistant],
    "response"}`, so that its tools (and `training/score.py`) read our answers as they read its own. The response is
    the answer alone: the original decoded the prompt too, which its scoring script cuts off again."""
    for row, answer in zip(rows, answers, strict=True):
        conversation = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        yield {"id": row["accession"], "conversation": conversation, "response": answer}


def write_jsonl(path: Path, records: Iterator[dict]) -> None:
    """JSON lines written to a temporary file, fsynced, then renamed over `path`: a reader (or a kill) sees the old
    file or the whole new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fingerprint(requests: Sequence[Request], sort_keys: Sequence) -> str:
    """What identifies the questions of a run: every question's messages and sort key (its protein's sequence)."""
    digest = hashlib.sha256()
    for i in range(len(requests)):
        digest.update(json.dumps([requests[i][0], repr(sort_keys[i])]).encode())
    return digest.hexdigest()


def _check_settings(shard_dir: Path, settings: dict[str, Any]) -> None:
    """A ValueError naming `shard_dir` when it holds answers generated with other settings or questions."""
    path = shard_dir / SETTINGS_FILE
    if not path.is_file():
        return
    earlier = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(key for key in settings.keys() | earlier.keys() if settings.get(key) != earlier.get(key))
    if changed:
        shown = ", ".join(f"{key} {earlier.get(key)!r} -> {settings.get(key)!r}" for key in changed[:3])
        raise ValueError(
            f"shard_dir: {shard_dir} holds answers generated with other settings ({shown}); rerun with the same ones "
            "to resume, or start over in a new folder"
        )


def _cut_torn_line(path: Path) -> None:
    """Drop the bytes after the last newline: a line a kill left half-written."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)


def _answered(shard_dir: Path) -> dict[int, str]:
    """{row index: answer} of every complete line in every process's shard file."""
    done: dict[int, str] = {}
    for path in sorted(shard_dir.glob("rank-*.jsonl")):
        for line in path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                record = json.loads(line)
                done.setdefault(record["index"], record["answer"])
    return done


def _shared_protein_features(model: PreTrainedModel, inputs: dict) -> dict:
    """`inputs` with the protein tensors replaced by `mm_encoder_outputs`: each distinct protein of the batch (the same
    tokens, coordinates and masks) encoded once, its features given to every question that asks about it."""
    names = [name for name in PROTEIN_INPUT_NAMES if name in inputs]
    tensors = {name: inputs.pop(name) for name in names}
    rows = [tensor.cpu().numpy() for tensor in tensors.values()]
    slot: dict[tuple[bytes, ...], int] = {}
    firsts, occurrence = [], []
    for i in range(len(rows[0])):
        key = tuple(row[i].tobytes() for row in rows)
        if key not in slot:
            slot[key] = len(firsts)
            firsts.append(i)
        occurrence.append(slot[key])
    index = torch.tensor(firsts, device=tensors[names[0]].device)
    distinct = {name: tensor.index_select(0, index) for name, tensor in tensors.items()}
    features = model.get_protein_features(**distinct, return_dict=True).pooler_output
    shared = BaseModelOutputWithPooling(pooler_output=[features[i] for i in occurrence])
    return {**inputs, "mm_encoder_outputs": {"protein": shared}}


def _generate_batch(
    model: PreTrainedModel,
    processor: SepitProcessor | PreTrainedTokenizerBase,
    requests: list[Request],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to one batch (left-padded), in its order."""
    conversations = [conversation for conversation, _ in requests]
    proteins = [protein for _, protein in requests]
    common = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    text_only = isinstance(processor, PreTrainedTokenizerBase)
    if text_only:
        inputs = processor.apply_chat_template(
            conversations, padding=True, tokenizer_kwargs={"padding_side": "left"}, **common
        )
    else:
        inputs = processor.apply_chat_template(
            conversations,
            proteins=proteins if any(proteins) else None,
            processor_kwargs={"padding": True, "padding_side": "left"},
            **common,
        )
    inputs = dict(inputs.to(model.device))
    if "protein_input_ids" in inputs:
        inputs = _shared_protein_features(model, inputs)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=(processor if text_only else processor.tokenizer).pad_token_id,
    )
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]


def open_shards(shard_dir: Path, stored: dict[str, Any], state: PartialState) -> tuple[dict[int, str], BinaryIO]:
    """The answers already in `shard_dir` (after `stored` is checked against its settings and each process's torn
    last line is cut) and this process's shard file, opened for appending. Every process calls it (also
    `sepit-annotate --server`, whose answers come from a server, so that its runs resume as these do)."""
    _check_settings(shard_dir, stored)  # every process, before any waits for another
    own = shard_dir / f"rank-{state.process_index:05d}.jsonl"
    if state.is_main_process:
        shard_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(shard_dir / SETTINGS_FILE, iter([stored]))
    state.wait_for_everyone()
    _cut_torn_line(own)
    state.wait_for_everyone()  # no file is read while its process may still cut it
    return _answered(shard_dir), own.open("ab")


def append_answers(handle: BinaryIO, answers: dict[int, str]) -> None:
    """{index: answer} appended to a shard file as lines and fsynced: what a rerun finds there survives a kill."""
    handle.write("".join(json.dumps({"index": i, "answer": a}) + "\n" for i, a in answers.items()).encode())
    handle.flush()
    os.fsync(handle.fileno())


def _answer_batch(
    model: PreTrainedModel,
    processor: SepitProcessor | PreTrainedTokenizerBase,
    batch: Sequence[tuple[int, Request]],
    max_new_tokens: int,
    handle: BinaryIO | None,
) -> dict[int, str]:
    """{index: answer} of one batch of numbered requests, appended to `handle` (and fsynced) when there is one."""
    answers = dict(
        zip(
            [i for i, _ in batch], _generate_batch(model, processor, [r for _, r in batch], max_new_tokens), strict=True
        )
    )
    if handle is not None:
        append_answers(handle, answers)
    return answers


@torch.no_grad()
def generate_in_batches(
    model: PreTrainedModel,
    processor: SepitProcessor | PreTrainedTokenizerBase,
    requests: Sequence[Request],
    sort_keys: Sequence,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    shard_dir: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "generating",
) -> list[str]:
    """Greedy answers to `requests`, in their order, on every process (see the module docstring). `processor` is a
    `SepitProcessor`, or a tokenizer for a text-only model (PureLLM). Requests with equal `sort_keys` share batches
    (give (length, protein) so that a protein's questions share its encoder pass).

    `shard_dir`: the folder of the per-process answer files that make the run resumable (created; None keeps the
    answers in memory only). `settings` (JSON values, e.g. the model's name) are stored there with the batch size,
    the token limit and a fingerprint of the questions; a rerun with any of them changed is a ValueError."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(sort_keys) != len(requests):
        raise ValueError(f"sort_keys: {len(sort_keys)} keys for {len(requests)} requests")
    state = PartialState(cpu=model.device.type == "cpu")  # on CPU, torchrun's processes are joined only when told
    order = sorted(range(len(requests)), key=lambda i: sort_keys[i])
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    done: dict[int, str] = {}
    handle = None
    if shard_dir is not None:
        stored = {
            **(settings or {}),
            "rows": len(requests),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "questions_sha256": _fingerprint(requests, sort_keys),
        }
        done, handle = open_shards(Path(shard_dir), stored, state)
    remaining = [batch for batch in batches if not all(i in done for i in batch)]
    mine = remaining[state.process_index :: state.num_processes]
    new: dict[int, str] = {}
    model.eval()
    try:
        for batch in tqdm(mine, desc=description, disable=not (progress and state.is_main_process)):
            new.update(_answer_batch(model, processor, [(i, requests[i]) for i in batch], max_new_tokens, handle))
    finally:
        if handle is not None:
            handle.close()
    for part in gather_object([new]):
        done.update(part)
    return [done[i] for i in range(len(requests))]


def _rows_of_window(window: dict[str, list]) -> list[dict]:
    """A window of `IterableDataset.batch` (columns of lists) as its rows."""
    columns = [column for column in window if column != WINDOW_COLUMN]
    return [dict(zip(columns, values, strict=True)) for values in zip(*(window[c] for c in columns), strict=True)]


def _own_rows(total: int | None, window: int, state: PartialState) -> int | None:
    """How many of `total` rows fall in this process's windows (every N-th from its rank): its progress bar's end."""
    if total is None:
        return None
    starts = range(state.process_index * window, total, state.num_processes * window)
    return sum(min(window, total - start) for start in starts)


@torch.no_grad()
def generate_streamed(
    model: PreTrainedModel,
    processor: SepitProcessor | PreTrainedTokenizerBase,
    rows: IterableDataset,
    requests_for: Callable[[list[dict]], tuple[list[Request], list]],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    window: int = 1024,
    shard_dir: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "generating",
    total: int | None = None,
) -> dict[int, str]:
    """Greedy answers to the rows of a stream (`datasets` `IterableDataset`), as {row number in the stream: answer}
    on every process, for splits that need not fit in memory.

    The stream is read `window` rows at a time; the windows are numbered and shared among processes by
    `datasets.distributed.split_dataset_by_node` (by example: process r takes windows r, r + N, ...; a window's rows
    are consecutive, so a protein's questions stay together). `requests_for` turns a window's rows into requests and
    sort keys (`evaluation_sepit.system_requests`); each window is sorted and cut into batches as
    `generate_in_batches` cuts the whole split, so its batches, and answers, are the same whatever the number of
    processes and wherever a run was killed. With `shard_dir`, answers are appended and resumed as there: a rerun
    reads past the windows already answered and generates only the batches that are not. `settings` are checked as
    there, with the batch size, token limit and window (no fingerprint of the questions: that would read the whole
    stream first). `total`: the number of rows, if known, for the progress bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    state = PartialState(cpu=model.device.type == "cpu")
    done: dict[int, str] = {}
    handle = None
    if shard_dir is not None:
        stored = {**(settings or {}), "batch_size": batch_size, "max_new_tokens": max_new_tokens, "window": window}
        done, handle = open_shards(Path(shard_dir), stored, state)
    windows = rows.batch(window).map(lambda _, number: {WINDOW_COLUMN: number}, with_indices=True)
    mine = split_dataset_by_node(windows, state.process_index, state.num_processes, strategy="examples")
    new: dict[int, str] = {}
    model.eval()
    bar = tqdm(
        total=_own_rows(total, window, state),
        desc=description,
        unit="rows",
        disable=not (progress and state.is_main_process),
    )
    try:
        for columns in mine:
            first = columns[WINDOW_COLUMN] * window
            requests, sort_keys = requests_for(_rows_of_window(columns))
            order = sorted(range(len(requests)), key=lambda i: sort_keys[i])
            for start in range(0, len(order), batch_size):
                batch = [first + i for i in order[start : start + batch_size]]
                if not all(i in done for i in batch):
                    numbered = [(i, requests[i - first]) for i in batch]
                    new.update(_answer_batch(model, processor, numbered, max_new_tokens, handle))
                bar.update(len(batch))
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    for part in gather_object([new]):
        done.update(part)
    return done


__all__ = [
    "QUESTION_COLUMNS",
    "Request",
    "generate_in_batches",
    "generate_streamed",
    "original_records",
    "prediction_records",
    "question_rows",
    "write_jsonl",
]
