"""Proteins/s of `sepit-annotate` (`dataset_card.annotation.annotate`) against a plain loop of the `protein-qa`
pipeline over the same proteins and questions, with the same model object, in one run.

The model is an untrained SEPIT assembled from tiny parts (`training/build_tiny_parts.py`), proteins cut at
`--max_protein_length` residues. Proteins: the first `--proteins` sequences of the InstructProtein GO-MF set, written
to a FASTA file and read as `sepit-annotate --fasta` reads it, or with `--structures FOLDER` the protein chains of a
structure folder (sequence and C-alpha coordinates). Questions: the command's six default ones. sepit-annotate answers
`--batch_size` proteins at a time, each encoded once for its six questions; the loop calls the pipeline once per
(protein, question), as a user without the command would. Both decode greedily at most `--max_new_tokens` tokens.
Reading the inputs is outside both timings (printed apart). The two alternate, `--repeats` times each after a warm-up
of both; the medians are printed, and how many answers agree.

`--vllm` also times `sepit-annotate --server` (`annotate_on_server`) against a `sepit-serve` of the same model,
started once (outside the timing; fp32, `--max-model-len 512 --enforce-eager`): the model's LLM then has 2 heads of
32, as `benchmarks/serving_throughput.py` builds it (vLLM's CPU attention refuses the tiny parts' head size 16), and
its answers are compared with `annotate`'s. Usage, from the repository root::

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/annotate_throughput.py --parts outputs/annotate/parts
"""

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import pipeline

from benchmarks.serving_throughput import build_folder, sepit_serve
from dataset_card.annotation import (
    DEFAULT_QUESTIONS,
    QUESTION_TYPES,
    annotate,
    annotate_on_server,
    question_set,
    read_proteins,
)
from dataset_card.external_benchmarks import GO_MF_FILE
from dataset_card.uniprot_reader import ReadReport
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor

ROOT = Path(__file__).resolve().parents[1]


def pipeline_loop(asker, proteins, questions: dict[str, str], max_new_tokens: int) -> list[str]:
    """One pipeline call per (protein, question), in the table's order."""
    answers = []
    for protein in proteins:
        for question in questions.values():
            request = {"question": question, "sequence": protein.sequence}
            if protein.coords is not None:
                request.update(coords=protein.coords, coords_mask=protein.coords_mask)
            answers.append(asker(request, max_new_tokens=max_new_tokens, do_sample=False)[0]["answer"])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(
        usage="%(prog)s --parts PARTS [--name value ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parts", required=True, help="Folder of training/build_tiny_parts.py")
    parser.add_argument("--proteins", type=int, default=24)
    parser.add_argument("--structures", default=None, help="Annotate this structure folder's chains instead")
    parser.add_argument("--max_protein_length", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4, help="sepit-annotate's proteins per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", nargs="+", default=list(DEFAULT_QUESTIONS), choices=sorted(QUESTION_TYPES))
    parser.add_argument("--vllm", action="store_true", help="Also time sepit-annotate --server on a sepit-serve")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.vllm:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            folder = build_folder(Path(args.parts), workdir, args.max_protein_length)
            start = time.perf_counter()
            url = stack.enter_context(sepit_serve(folder, workdir / "serve.log"))[1]
            print(f"sepit-serve started in {time.perf_counter() - start:.1f} s")
        run(args, url if args.vllm else None, folder if args.vllm else None)


def run(args: argparse.Namespace, url: str | None, folder: Path | None) -> None:
    """Time annotate against the loop (and against annotate_on_server at `url`, serving `folder`) and print."""
    torch.manual_seed(0)
    if folder is None:
        protein_part, language_part = f"{args.parts}/protein_model", f"{args.parts}/language_model"
        processor = SepitProcessor.from_pretrained_parts(
            protein_part, language_part, max_protein_length=args.max_protein_length
        )
        model = SepitForConditionalGeneration.from_pretrained_parts(
            protein_part, language_part, protein_token_id=processor.protein_token_id
        ).eval()
    else:
        processor = SepitProcessor.from_pretrained(folder)
        model = SepitForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    asker = pipeline("protein-qa", model=model, processor=processor)
    questions = question_set(args.questions)
    start = time.perf_counter()
    if args.structures:
        proteins = read_proteins(structures=args.structures)[: args.proteins]
    else:
        with tempfile.TemporaryDirectory() as scratch:
            fasta = Path(scratch) / "proteins.fasta"
            lines = GO_MF_FILE.read_text().splitlines()[: args.proteins]
            sequences = [json.loads(line)["sequence"] for line in lines]
            fasta.write_text("".join(f">P{i}\n{sequence}\n" for i, sequence in enumerate(sequences)))
            proteins = read_proteins([str(fasta)])
    reading = time.perf_counter() - start
    lengths = sorted(min(len(protein.sequence), args.max_protein_length) for protein in proteins)
    with_structure = sum(protein.coords is not None for protein in proteins)

    def run_annotate() -> list[str]:
        rows = annotate(model, processor, proteins, questions, args.batch_size, args.max_new_tokens, progress=False)
        return [row["answer"] for row in rows]

    def run_loop() -> list[str]:
        return pipeline_loop(asker, proteins, questions, args.max_new_tokens)

    def run_server() -> list[str]:
        report = ReadReport()
        rows = annotate_on_server(
            url, processor, proteins, questions, not model.config.sequence_only, report, args.batch_size,
            args.max_new_tokens, progress=False,
        )  # fmt: skip
        assert not report.problems, report.problems
        return [row["answer"] for row in rows]

    runs = {"annotate": run_annotate, "loop": run_loop} | ({"vllm": run_server} if url else {})
    times: dict[str, list[float]] = {name: [] for name in runs}
    answers = {name: answer_all() for name, answer_all in runs.items()}  # warm-up
    changed: dict[str, int] = dict.fromkeys(runs, 0)
    for _ in range(args.repeats):
        for name, answer_all in runs.items():
            start = time.perf_counter()
            # vLLM's batches vary with the timing of the requests; transformers' answers must not change at all.
            changed[name] += answer_all() != answers[name]
            times[name].append(time.perf_counter() - start)
    assert not changed["annotate"] and not changed["loop"], f"answers changed between runs: {changed}"
    agree = sum(a == b for a, b in zip(answers["annotate"], answers["loop"], strict=True))
    median = {name: statistics.median(values) for name, values in times.items()}
    hidden = (model.config.protein_config.hidden_size, model.config.text_config.hidden_size)
    print(
        f"{torch.get_num_threads()} threads; {len(proteins)} proteins ({with_structure} with structures; residues "
        f"median {statistics.median(lengths):.0f}, max {lengths[-1]}) x {len(questions)} questions; ESM/LLM width "
        f"{hidden[0]}/{hidden[1]}; at most {args.max_new_tokens} new tokens; medians of {args.repeats} runs; "
        f"reading the inputs {reading:.2f} s"
    )
    print("| sepit-annotate s | pipeline loop s | annotate proteins/s | loop proteins/s | speed-up | answers equal |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {median['annotate']:.2f} | {median['loop']:.2f} | {len(proteins) / median['annotate']:.2f} | "
        f"{len(proteins) / median['loop']:.2f} | {median['loop'] / median['annotate']:.2f}x | "
        f"{agree}/{len(answers['loop'])} |"
    )
    if url:
        same = sum(a == b for a, b in zip(answers["vllm"], answers["annotate"], strict=True))
        print(
            "| sepit-annotate on vLLM s | on transformers s | vLLM proteins/s | transformers proteins/s | "
            "vLLM / transformers | answers equal |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {median['vllm']:.2f} | {median['annotate']:.2f} | {len(proteins) / median['vllm']:.2f} | "
            f"{len(proteins) / median['annotate']:.2f} | {median['annotate'] / median['vllm']:.2f}x | "
            f"{same}/{len(answers['annotate'])} |"
        )
        print(f"vLLM runs whose answers differed from its warm-up's: {changed['vllm']} of {args.repeats}")
    print("runs (s):", json.dumps({name: [round(value, 2) for value in values] for name, values in times.items()}))


if __name__ == "__main__":
    main()
