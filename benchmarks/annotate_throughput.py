"""Proteins/s of `sepit-annotate` (`dataset_card.annotation.annotate`) against a plain loop of the `protein-qa`
pipeline over the same proteins and questions, with the same model object, in one run.

The model is an untrained SEPIT assembled from tiny parts (`training/build_tiny_parts.py`), proteins cut at
`--max_protein_length` residues. Proteins: the first `--proteins` sequences of the InstructProtein GO-MF set, written
to a FASTA file and read as `sepit-annotate --fasta` reads it, or with `--structures FOLDER` the protein chains of a
structure folder (sequence and C-alpha coordinates). Questions: the command's six default ones. sepit-annotate answers
`--batch_size` proteins at a time, each encoded once for its six questions; the loop calls the pipeline once per
(protein, question), as a user without the command would. Both decode greedily at most `--max_new_tokens` tokens.
Reading the inputs is outside both timings (printed apart). The two alternate, `--repeats` times each after a warm-up
of both; the medians are printed, and how many answers agree. Usage, from the repository root::

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/annotate_throughput.py --parts outputs/annotate/parts
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import pipeline

from dataset_card.annotation import DEFAULT_QUESTIONS, annotate, question_set, read_proteins
from dataset_card.external_benchmarks import GO_MF_FILE
from modeling_sepit import SepitForConditionalGeneration, SepitProcessor


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
    args = parser.parse_args()
    torch.manual_seed(0)
    protein_part, language_part = f"{args.parts}/protein_model", f"{args.parts}/language_model"
    processor = SepitProcessor.from_pretrained_parts(
        protein_part, language_part, max_protein_length=args.max_protein_length
    )
    model = SepitForConditionalGeneration.from_pretrained_parts(
        protein_part, language_part, protein_token_id=processor.protein_token_id
    ).eval()
    asker = pipeline("protein-qa", model=model, processor=processor)
    questions = question_set(DEFAULT_QUESTIONS)
    start = time.perf_counter()
    if args.structures:
        proteins = read_proteins(structures=args.structures)[: args.proteins]
    else:
        with tempfile.TemporaryDirectory() as folder:
            fasta = Path(folder) / "proteins.fasta"
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

    times: dict[str, list[float]] = {"annotate": [], "loop": []}
    answers = {"annotate": run_annotate(), "loop": run_loop()}  # warm-up
    for _ in range(args.repeats):
        for name, run in (("annotate", run_annotate), ("loop", run_loop)):
            start = time.perf_counter()
            assert run() == answers[name], f"{name}: answers changed between runs"
            times[name].append(time.perf_counter() - start)
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
    print("runs (s):", json.dumps({name: [round(value, 2) for value in values] for name, values in times.items()}))


if __name__ == "__main__":
    main()
