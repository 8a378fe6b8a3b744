"""Annotate proteins with a SEPIT model: every protein of FASTA files, UniProtKB files or a folder of structures is
asked a set of questions, and the answers are written as a table, one row per (protein, question).

    sepit-annotate --model_name_or_path outputs/main/stage2 --fasta proteome.fasta --output_dir outputs/annotation
    sepit-annotate --model_name_or_path outputs/main/stage2 --structures alphafold_models/ --output_dir ...
    torchrun --nproc_per_node 8 -m dataset_card.annotation --device cuda --dtype bfloat16 ... (one GPU per process)

Inputs: `--fasta` (a UniProt header `>sp|P69905|HBA_HUMAN ...` names the protein by its accession, any other header by
its first word), `--uniprot` (UniProtKB flat, XML or JSON files or folders, read by `dataset_card.uniprot_reader`),
and `--structures`, a folder of PDB/mmCIF/AlphaFold DB files: with sequence inputs, each protein gets the structure
that declares its accession and resolves most of its residues (as the dataset builder attaches them); alone, every
protein chain of every file is a protein (named by the file's path in the folder, `<path>:<chain>` for a file of
several chains). A record that cannot be read (letters that are no amino acids, a broken structure file, a duplicate
id) is reported with its reason and skipped; the list is also written to `skipped.jsonl`.

Questions: by default the function, subcellular location, GO terms (molecular function, biological process, cellular
component) and EC number, each worded as the first template of its type in `dataset_card.instructions` (the wording
the model was trained on); `--questions` picks other types of that list, `--questions_file` gives a JSON object
`{"name": "question with one <protein> tag", ...}` instead.

Generation is `modeling_sepit.batch_generation`'s loop (the one of `training/generate.py`): a batch holds whole
proteins with all their questions, so each protein is encoded once and its features serve every question; data-parallel
under `torchrun`/`accelerate launch` (each process answers every N-th batch; the table is the same as from one
process); resumable: each process appends its answers to `<output_dir>/shards/`, and rerunning the same command after
a kill continues where it stopped (other settings are refused; `--overwrite` starts over). Writes
`<output_dir>/annotations.parquet` and `annotations.csv` (protein_id, source, sequence_length, structure_used,
structure_source, question_type, question, answer; proteins in input order, questions in the order given).

On vLLM: `--server http://127.0.0.1:8000` names a running `sepit-serve` (modeling_sepit/serving.py) of the same
model, which then answers instead of this process: each (protein, question) is one of its requests (a question with a
`{"sequence", "coords", "coords_mask"}` protein, greedy, `max_tokens` = `--max_new_tokens`), `--batch_size` proteins'
worth of them in flight at once, which vLLM batches continuously. The table is the same; answers are appended to the
shards as they arrive, so a rerun resumes the same way. A request the server refuses (HTTP 400, e.g. a prompt longer
than its `--max-model-len`) is reported with the server's reason and its protein skipped; a server that cannot be
reached, or fails otherwise, stops the run with one line (exit 2 before any request, 1 after: rerun to resume).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TextIO

import biotite.structure as struc
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import numpy as np
from accelerate import PartialState
from Bio import SeqIO
from datasets import Dataset, Features, Value
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dataset_card.instructions import OPEN_ENDED, PROTEIN_TAG
from dataset_card.structures import STRUCTURE_SUFFIXES, StructureIndex
from dataset_card.uniprot_reader import ReadReport, iter_entries
from modeling_sepit import SepitConfig, SepitForConditionalGeneration, SepitProcessor
from modeling_sepit.atomic_folder import check_output_path
from modeling_sepit.batch_generation import (
    SHARDS,
    append_answers,
    check_generation_settings,
    generate_in_batches,
    open_shards,
    start_sharded_run,
    write_jsonl,
)
from modeling_sepit.cli_sepit import check_device, script_parser
from modeling_sepit.hub_sepit import require_local_or_cached
from modeling_sepit.structure_loading import check_sequence, file_kind, load_structure, read_structure_text

WRITER = "annotate"
# Function, subcellular location, GO terms (the dataset asks one question per GO aspect) and EC number.
DEFAULT_QUESTIONS = ("function", "subcellular_location", "go_mf", "go_bp", "go_cc", "ec_number")
QUESTION_TYPES = {kind.type: kind.templates[0] for kind in OPEN_ENDED}
FEATURES = Features(
    {
        "protein_id": Value("string"),
        "source": Value("string"),
        "sequence_length": Value("int32"),
        "structure_used": Value("bool"),
        "structure_source": Value("string"),
        "question_type": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
    }
)
_UNIPROT_HEADER = re.compile(r"^(?:sp|tr)\|([^|]+)\|")
SERVER_TIMEOUT = 3600  # seconds one answer may take on the server: what sepit-serve allows vLLM


@dataclass(frozen=True, eq=False)
class Protein:
    """One protein to annotate: its id, sequence, where it was read, and C-alpha coordinates on its residues (NaN or
    mask False where a residue has none) when a structure was found (`eq=False`: numpy fields have no `==`)."""

    id: str
    sequence: str
    source: str
    coords: np.ndarray | None = None
    coords_mask: np.ndarray | None = None
    structure_source: str | None = None


def question_set(types: Sequence[str] = DEFAULT_QUESTIONS, questions_file: str | None = None) -> dict[str, str]:
    """{name: question}: the dataset's wording of each type in `types`, or the questions of `questions_file` (a JSON
    object of names to questions); each must hold one `<protein>` tag, where the protein goes."""
    if questions_file is None:
        unknown = [name for name in types if name not in QUESTION_TYPES]
        if unknown or not types:
            raise ValueError(f"questions: unknown types {unknown}; choose from {sorted(QUESTION_TYPES)}")
        return {name: QUESTION_TYPES[name] for name in dict.fromkeys(types)}
    try:
        questions = json.loads(Path(questions_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"questions_file: cannot read {questions_file} ({type(error).__name__}: {error})") from error
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f'questions_file: {questions_file} must hold a JSON object {{"name": "question", ...}}')
    for name, question in questions.items():
        if not isinstance(question, str) or question.count(PROTEIN_TAG) != 1:
            raise ValueError(
                f"questions_file: question {name!r} of {questions_file} must be a string with one {PROTEIN_TAG} tag "
                f"(where the protein goes), got {question!r}"
            )
    return questions


def _open_text(path: Path) -> TextIO:
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _fasta_proteins(path: Path, report: ReadReport) -> Iterator[Protein]:
    """The records of a FASTA file, letters uppercased and a final stop `*` dropped; records with other letters are
    reported and skipped, as is the rest of a file that is not FASTA."""
    kind = file_kind(path, "FASTA file")
    if kind != "file":
        raise ValueError(f"fasta: {path}: {kind}; give FASTA files")
    try:
        with _open_text(path) as handle:
            for record in SeqIO.parse(handle, "fasta"):
                match = _UNIPROT_HEADER.match(record.id)
                protein_id = match.group(1) if match else record.id
                sequence = str(record.seq).upper().removesuffix("*")
                try:
                    check_sequence(sequence, "sequence")
                except ValueError as error:
                    report.skip(str(path), protein_id or record.description, str(error))
                    continue
                report.read[str(path)] += 1
                yield Protein(protein_id, sequence, str(path))
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as error:  # not FASTA, binary, corrupt gzip
        reason = " ".join(str(error).split("\n\n")[0].split())
        report.skip(str(path), "rest of file", f"not read as FASTA: {type(error).__name__}: {reason}")


def _protein_chain_ids(path: Path) -> list[str]:
    """The author ids of the chains holding amino acids in the first model of a structure file."""
    text = read_structure_text(path)
    if path.name.lower().removesuffix(".gz").endswith((".cif", ".mmcif")):
        atoms = pdbx.get_structure(pdbx.CIFFile.read(io.StringIO(text)).block, model=1, use_author_fields=True)
    else:
        atoms = pdb.PDBFile.read(io.StringIO(text)).get_structure(model=1)
    return list(dict.fromkeys(atoms[struc.filter_amino_acids(atoms)].chain_id.tolist()))


def _structure_proteins(folder: Path, report: ReadReport) -> Iterator[Protein]:
    """Every protein chain of every structure file under `folder`, in path order; a file or chain that cannot be read
    is reported and skipped."""
    paths = sorted(p for p in folder.rglob("*") if p.name.lower().removesuffix(".gz").endswith(STRUCTURE_SUFFIXES))
    for path in paths:
        kind = file_kind(path)
        if kind != "file":
            if kind != "folder":
                report.skip(str(path), "structure file", kind)
            continue
        name = path.relative_to(folder).as_posix()
        try:
            structures = [(name, load_structure(path))]
        except ValueError as error:
            try:
                chains = _protein_chain_ids(path)
            except Exception:  # noqa: BLE001 - the file is broken: its first error is the one to report
                chains = []
            if len(chains) < 2:
                report.skip(str(path), "structure file", str(error))
                continue
            structures = []
            for chain in chains:
                try:
                    structures.append((f"{name}:{chain}", load_structure(path, chain)))
                except ValueError as chain_error:
                    report.skip(str(path), f"chain {chain}", str(chain_error))
        for protein_id, structure in structures:
            try:
                check_sequence(structure.sequence, "sequence")
            except ValueError as error:
                report.skip(str(path), f"chain {structure.chain}", str(error))
                continue
            mask = np.isfinite(structure.coords).all(-1)
            report.read[str(path)] += 1
            yield Protein(
                protein_id,
                structure.sequence,
                str(path),
                structure.coords if mask.any() else None,
                mask if mask.any() else None,
                f"{path.name}:{structure.chain}" if mask.any() else None,
            )


def read_proteins(
    fasta: Sequence[str] = (),
    uniprot: Sequence[str] = (),
    structures: str | None = None,
    report: ReadReport | None = None,
) -> list[Protein]:
    """The proteins of the inputs (see the module docstring), in input order; what cannot be read goes to `report`.
    A ValueError names an input that is missing or of the wrong kind."""
    report = report if report is not None else ReadReport()
    if not (fasta or uniprot or structures):
        raise ValueError("fasta/uniprot/structures: no input; give FASTA files, UniProtKB files or a structure folder")
    if structures is not None and not Path(structures).is_dir():
        raise ValueError(f"structures: {structures} is not a folder; give a folder of PDB/mmCIF/AlphaFold files")
    if not (fasta or uniprot):
        found: Iterator[Protein] = _structure_proteins(Path(structures), report)
    else:
        found = _sequence_proteins(
            fasta, uniprot, StructureIndex.scan(structures, report) if structures else None, report
        )
    proteins: dict[str, Protein] = {}
    for protein in found:
        if protein.id in proteins:
            report.skip(
                protein.source, protein.id, f"duplicate protein id (first read from {proteins[protein.id].source})"
            )
            continue
        proteins[protein.id] = protein
    return list(proteins.values())


def _sequence_proteins(
    fasta: Sequence[str], uniprot: Sequence[str], index: StructureIndex | None, report: ReadReport
) -> Iterator[Protein]:
    """The proteins of FASTA and UniProtKB files, each with the structure of `index` that fits it best, if any."""
    for path in fasta:
        if not os.path.lexists(path):
            raise ValueError(f"fasta: {path} does not exist; give FASTA files")
    read = [protein for path in fasta for protein in _fasta_proteins(Path(path), report)]
    for path in uniprot:
        read += [Protein(entry.accession, entry.sequence, str(path)) for entry in iter_entries(path, report)]
    for protein in read:
        attached = index.attach(protein.id, protein.sequence) if index is not None else None
        if attached is None:
            yield protein
        else:
            yield Protein(
                protein.id, protein.sequence, protein.source, attached.coords, attached.coords_mask, attached.source
            )


def _digest(proteins: Sequence[Protein]) -> str:
    """What identifies the proteins of a run (ids, sequences and coordinates), for a rerun's settings check."""
    digest = hashlib.sha256()
    for protein in proteins:
        digest.update(json.dumps([protein.id, protein.sequence, protein.structure_source]).encode())
        if protein.coords is not None:
            digest.update(np.ascontiguousarray(protein.coords, dtype=np.float32).tobytes())
    return digest.hexdigest()


def annotate(
    model: PreTrainedModel,
    processor: SepitProcessor,
    proteins: Sequence[Protein],
    questions: Mapping[str, str],
    batch_size: int = 4,
    max_new_tokens: int = 64,
    shard_dir: str | os.PathLike | None = None,
    settings: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per (protein, question), proteins in their order and questions in theirs (columns: `FEATURES`).
    Batches hold `batch_size` whole proteins: the requests are sorted by (length, protein) and cut every `batch_size`
    x questions, so a protein's questions never straddle two batches and each protein is encoded once in the run.
    Shared among processes and resumable from `shard_dir` (see `generate_in_batches`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    structure_used = not model.config.sequence_only
    requests, sort_keys = [], []
    for number, protein in enumerate(proteins):
        given = {"sequence": protein.sequence}
        if protein.coords is not None:
            given.update(coords=protein.coords, coords_mask=protein.coords_mask)
        for question in questions.values():
            requests.append(([{"role": "user", "content": question}], [given]))
            sort_keys.append((len(protein.sequence), number))
    answers = generate_in_batches(
        model,
        processor,
        requests,
        sort_keys,
        batch_size * len(questions),
        max_new_tokens,
        shard_dir=shard_dir,
        settings={**(settings or {}), "proteins_sha256": _digest(proteins)},
        progress=progress,
        description=f"annotating {len(proteins)} proteins",
    )
    return _rows(proteins, questions, answers, structure_used)


def _rows(
    proteins: Sequence[Protein], questions: Mapping[str, str], answers: Sequence[str | None], structure_used: bool
) -> list[dict]:
    """The table: one row per (protein, question), `answers` in that order; a protein with an answer missing (None:
    the server refused it) is left out whole."""
    rows, answer = [], iter(answers)
    for protein in proteins:
        own = [next(answer) for _ in questions]
        if None in own:
            continue
        rows += [
            {
                "protein_id": protein.id,
                "source": protein.source,
                "sequence_length": len(protein.sequence),
                "structure_used": structure_used and protein.coords is not None,
                "structure_source": protein.structure_source,
                "question_type": name,
                "question": question,
                "answer": text,
            }
            for (name, question), text in zip(questions.items(), own, strict=True)
        ]
    return rows


class ServerError(RuntimeError):
    """The server failed, not the request (unreachable, 5xx, no chat.completion): the run stops, its answers kept."""


class RequestRejected(Exception):
    """The server refused one request (HTTP 400), with its reason."""


def check_server(url: str) -> str:
    """The base URL of a running sepit-serve (`url` without a final `/`): a ValueError naming `server` when the URL is
    not one, nothing answers there, or what answers is not sepit-serve (vLLM's own server answers /health with an
    empty body)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a port out of range or not a number is a ValueError here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"server: the base URL of a running sepit-serve, e.g. http://127.0.0.1:8000, got {url!r}")
    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            data = response.read()
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise ValueError(f"server: nothing answers at {base} ({reason}); start sepit-serve there first") from None
    try:
        status = json.loads(data).get("status")
    except (ValueError, AttributeError):
        status = None
    if status != "ok":
        raise ValueError(
            f'server: {base}/health answered {data[:80]!r}, not sepit-serve\'s {{"status": "ok"}}; give the URL '
            "sepit-serve printed (not its vLLM child's)"
        )
    return base


def server_request(protein: Protein, question: str, max_new_tokens: int) -> dict:
    """sepit-serve's request (README "Serving with vLLM") asking `question` about `protein`, greedy as the transformers
    path; coordinates the structure lacks are sent as 0 with `coords_mask` False, as the processor stores them."""
    given: dict = {"sequence": protein.sequence}
    if protein.coords is not None:
        mask = protein.coords_mask
        given.update(coords=np.where(mask[:, None], protein.coords, 0.0).tolist(), coords_mask=mask.tolist())
    return {"question": question, "protein": given, "max_tokens": max_new_tokens, "temperature": 0}


def ask_server(url: str, protein: Protein, question: str, max_new_tokens: int) -> list[int]:
    """The answer's token ids from sepit-serve at `url` to `question` about `protein`: RequestRejected with the
    server's reason for a 400, ServerError for any other failure. The request is made here, in the thread that sends
    it, so that only the requests in flight are held in memory."""
    body = server_request(protein, question, max_new_tokens)
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=SERVER_TIMEOUT) as response:
            data = response.read()
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:300]
        if error.code == HTTPStatus.BAD_REQUEST:
            raise RequestRejected(message) from None
        raise ServerError(f"server: {url} answered {error.code} ({message})") from None
    except OSError as error:
        raise ServerError(f"server: {url} unreachable ({getattr(error, 'reason', error)})") from None
    try:
        ids = json.loads(data)["choices"][0]["token_ids"]
    except (ValueError, KeyError, IndexError, TypeError):
        ids = None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ServerError(f"server: {url} answered {data[:120]!r}, not sepit-serve's chat.completion with token_ids")
    return ids


def annotate_on_server(
    url: str,
    processor: SepitProcessor,
    proteins: Sequence[Protein],
    questions: Mapping[str, str],
    structure_used: bool,
    report: ReadReport,
    batch_size: int = 4,
    max_new_tokens: int = 64,
    shard_dir: str | os.PathLike | None = None,
    settings: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """The rows of `annotate`, answered by the sepit-serve at `url` (see the module docstring), `batch_size` x questions
    requests in flight. The answers are the server's token ids decoded by `processor` as `annotate` decodes its own
    (vLLM's text holds back the bytes of a character that the token limit cut, where transformers writes U+FFFD).
    `structure_used`: whether the served model reads structures (not `sequence_only`). A protein with a refused
    request goes to `report` with the server's reason and is left out; a failing server raises ServerError. With
    `shard_dir`, each answer is appended as it arrives and a rerun asks only what is missing (`settings` checked as in
    `generate_in_batches`, with the proteins, questions and token limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs = [(protein, name, question) for protein in proteins for name, question in questions.items()]
    done: dict[int, str] = {}
    handle = None
    if shard_dir is not None:
        stored = {
            **(settings or {}),
            "proteins_sha256": _digest(proteins),
            "questions": dict(questions),
            "max_new_tokens": max_new_tokens,
        }
        done, handle = open_shards(Path(shard_dir), stored, PartialState(cpu=True))
    refused: dict[str, str] = {}
    try:
        with ThreadPoolExecutor(batch_size * len(questions)) as pool:
            asked = {
                pool.submit(ask_server, url, protein, question, max_new_tokens): i
                for i, (protein, _, question) in enumerate(pairs)
                if i not in done
            }
            try:
                answered = as_completed(asked)
                for future in tqdm(answered, total=len(asked), desc=f"annotating on {url}", disable=not progress):
                    i = asked[future]
                    try:
                        ids = future.result()
                    except RequestRejected as error:
                        protein, name, _ = pairs[i]
                        refused.setdefault(protein.id, f"the server refused question {name!r}: {error}")
                        continue
                    done[i] = processor.batch_decode([ids], skip_special_tokens=True)[0].strip()
                    if handle is not None:
                        append_answers(handle, {i: done[i]})
            except BaseException:
                pool.shutdown(cancel_futures=True)  # what is not in flight is not sent
                raise
    finally:
        if handle is not None:
            handle.close()
    for protein in proteins:
        if protein.id in refused:
            report.skip(protein.source, protein.id, refused[protein.id])
    return _rows(proteins, questions, [done.get(i) for i in range(len(pairs))], structure_used)


def write_table(rows: Sequence[dict], output_dir: Path) -> None:
    """`annotations.parquet` and `annotations.csv`, each written beside and renamed over its path (a reader or a kill
    sees the old file or the whole new one)."""
    table = Dataset.from_list(list(rows), features=FEATURES)
    for name, write in (("annotations.parquet", table.to_parquet), ("annotations.csv", table.to_csv)):
        temporary = output_dir / f".{name}.tmp"
        write(str(temporary))
        os.replace(temporary, output_dir / name)


@dataclass
class AnnotateArguments:
    """Which model annotates which proteins, with which questions."""

    model_name_or_path: str = field(metadata={"help": "SEPIT folder or Hub id."})
    output_dir: str = field(metadata={"help": "Folder for the table (and the shards a rerun resumes from)."})
    fasta: list[str] = field(default_factory=list, metadata={"help": "FASTA files (optionally gzipped)."})
    uniprot: list[str] = field(
        default_factory=list,
        metadata={"help": "UniProtKB files or folders (flat text, XML, JSON; optionally gzipped)."},
    )
    structures: str | None = field(
        default=None,
        metadata={"help": "Folder of PDB/mmCIF/AlphaFold files: attached by accession, or alone the proteins."},
    )
    questions: list[str] = field(
        default_factory=lambda: list(DEFAULT_QUESTIONS),
        metadata={"help": f"Question types, worded as the dataset's: any of {sorted(QUESTION_TYPES)}."},
    )
    questions_file: str | None = field(
        default=None, metadata={"help": 'JSON {"name": "question with one <protein>"}; replaces --questions.'}
    )
    batch_size: int = field(
        default=4,
        metadata={"help": "Proteins answered together (per process), all questions each; with --server, in flight."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Length limit of each answer."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights' dtype: auto (the checkpoint's own, transformers' default), float32, bfloat16."},
    )
    device: str = field(
        default="cpu", metadata={"help": "Device to generate on; cuda under several processes: one GPU each."}
    )
    server: str | None = field(
        default=None,
        metadata={
            "help": "URL of a running sepit-serve of this model (http://127.0.0.1:8000): it answers, its LLM on vLLM."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write output_dir even if something else wrote it, and start over."}
    )

    def __post_init__(self) -> None:
        given = self.model_name_or_path
        if (Path(given).is_absolute() or given.startswith(".")) and not Path(given).is_dir():
            raise ValueError(f"model_name_or_path: {given} is not a folder; give a model folder or a Hub id")
        check_generation_settings(None, self.batch_size, self.max_new_tokens)
        check_device(self.device)
        if self.server is not None:
            if (self.dtype, self.device) != ("auto", "cpu"):
                raise ValueError("dtype/device: with --server the server's own apply; give --dtype to sepit-serve")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(
                    "server: one process sends the requests (the server batches them); run without torchrun"
                )
        self.question_texts = question_set(self.questions, self.questions_file)
        check_output_path(self.output_dir, WRITER, self.inputs, self.overwrite)

    @property
    def inputs(self) -> list[str | None]:
        """What the command reads: the output may not replace or lie inside any of them."""
        return [self.model_name_or_path, *self.fasta, *self.uniprot, self.structures, self.questions_file]

    @property
    def settings(self) -> dict[str, str]:
        """What the answers depend on besides the questions, batch size and token limit: a rerun must repeat it."""
        if self.server is not None:  # the server's dtype; its URL may change between runs (a restart, another port)
            return {"model": self.model_name_or_path, "engine": "sepit-serve"}
        return {"model": self.model_name_or_path, "dtype": self.dtype}


def main(argv: list[str] | None = None) -> int:
    parser = script_parser([AnnotateArguments], __doc__)
    report = ReadReport()
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        require_local_or_cached(args.model_name_or_path, "model_name_or_path")
        server = check_server(args.server) if args.server is not None else None
        proteins = read_proteins(args.fasta, args.uniprot, args.structures, report)
        if not proteins:
            raise ValueError(f"no readable protein in the inputs ({report.total_skipped} problems reported)")
        processor = SepitProcessor.from_pretrained(args.model_name_or_path)
        if server is None:
            model = SepitForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=args.dtype)
        else:  # its tokenizer decodes the server's answers; whether they read structures is all it needs of the model
            structure_used = not SepitConfig.from_pretrained(args.model_name_or_path).sequence_only
    except (ValueError, OSError) as error:  # arguments, inputs or model
        for problem in report.problems:
            print(f"annotate: skipped {problem.file} ({problem.entry}): {problem.reason}", file=sys.stderr)
        print(f"annotate: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    state, device = start_sharded_run(args.device, output_dir, WRITER, args.inputs, args.overwrite)
    if state.is_main_process:
        for problem in report.problems:
            print(f"annotate: skipped {problem.file} ({problem.entry}): {problem.reason}", file=sys.stderr)
    read_problems = len(report.problems)
    try:
        if server is None:
            rows = annotate(
                model.to(device),
                processor,
                proteins,
                args.question_texts,
                args.batch_size,
                args.max_new_tokens,
                shard_dir=output_dir / SHARDS,
                settings=args.settings,
            )
        else:
            rows = annotate_on_server(
                server,
                processor,
                proteins,
                args.question_texts,
                structure_used,
                report,
                args.batch_size,
                args.max_new_tokens,
                shard_dir=output_dir / SHARDS,
                settings=args.settings,
            )
    except ValueError as error:  # the shards of an earlier run with other settings
        print(f"annotate: error: {' '.join(str(error).split())} (--overwrite starts over here)", file=sys.stderr)
        return 2
    except ServerError as error:
        print(
            f"annotate: error: {error}; the answers so far are kept: rerun the same command to resume", file=sys.stderr
        )
        return 1
    for problem in report.problems[read_problems:]:  # requests the server refused
        print(f"annotate: skipped {problem.file} ({problem.entry}): {problem.reason}", file=sys.stderr)
    if state.is_main_process:
        write_table(rows, output_dir)
        skipped = ({"file": p.file, "entry": p.entry, "reason": p.reason} for p in report.problems)
        write_jsonl(output_dir / "skipped.jsonl", skipped)
        print(
            f"annotate: {len(rows) // len(args.question_texts)} proteins x {len(args.question_texts)} questions in "
            f"{output_dir} "
            f"({report.total_skipped} problems reported)"
        )
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
