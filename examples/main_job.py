"""The main job (until the training pipeline lands): convert the bundled original-format SEPIT checkpoint, check it
against the original implementation's outputs, and ask it about a real protein from a PDB file.

    ./run.sh main [--case original-tiny-moe-top1] [--structure tests/fixtures/structures/biotite__1aki.pdb --chain A]

The bundled checkpoints are tiny and random: the answer is noise; what is checked is that conversion is exact and that
a real sequence with its structure goes through encoder, projector and LLM to decoded text.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser, pipeline

from modeling_sepit import SepitForConditionalGeneration, load_structure
from modeling_sepit.convert_original_sepit import convert, verify_conversion

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = ROOT / "tests" / "fixtures" / "sepit-original"


@dataclass
class MainJobArguments:
    case: str = field(default="original-tiny-moe-top1", metadata={"help": "Bundled original-format checkpoint."})
    structure: str = field(
        default=str(ROOT / "tests" / "fixtures" / "structures" / "biotite__1aki.pdb"),
        metadata={"help": "PDB file of the protein to ask about (default: hen egg-white lysozyme, 1AKI)."},
    )
    chain: str = field(default="A", metadata={"help": "Author chain id in the structure file."})
    question: str = field(default="What is the function of <bop><protein><eop> ?", metadata={"help": "Question."})
    output_dir: str = field(default=str(ROOT / "outputs" / "converted"), metadata={"help": "Converted model folder."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens to generate."})


def main() -> int:
    (args,) = HfArgumentParser(MainJobArguments).parse_args_into_dataclasses()
    original = ORIGINAL / args.case
    print(f"[1/3] converting {original.relative_to(ROOT)} -> {args.output_dir}")
    convert(original, args.output_dir)
    model = SepitForConditionalGeneration.from_pretrained(args.output_dir).eval()

    print("[2/3] checking the converted model against the original implementation's outputs")
    figures = verify_conversion(model, original / "expected_outputs.safetensors")
    for name, value in figures.items():
        print(f"      {name}: {value:.3g}")
    exact = figures["max_abs_logits"] <= 1e-4 and figures["max_abs_loss"] <= 1e-5
    exact = exact and figures["greedy_token_mismatches"] == 0
    print(f"      parity: {'OK' if exact else 'FAILED'} (tolerances: logits 1e-4, loss 1e-5, identical greedy tokens)")

    print(f"[3/3] asking about {Path(args.structure).name} chain {args.chain} through pipeline('protein-qa')")
    qa = pipeline("protein-qa", model=args.output_dir)
    structure = load_structure(args.structure, chain=args.chain)
    request = {"question": args.question, "structure": args.structure, "chain": args.chain}
    answer = qa(request, max_new_tokens=args.max_new_tokens)["answer"]
    resolved = int(np.isfinite(structure.coords).all(-1).sum())
    print(f"      protein: {len(structure.sequence)} residues, {resolved} with C-alpha coordinates")
    print(f"      sequence: {structure.sequence[:60]}...")
    print(f"      question: {args.question}")
    print(f"      answer (tiny random checkpoint): {answer!r}")
    print(f"done: converted model in {args.output_dir}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
