"""The main job (until the training pipeline lands): convert the bundled original-format SEPIT checkpoint, check it
against the original implementation's outputs, and ask it about a real protein from a PDB file.

    ./run.sh main [--case original-tiny-moe-top1] [--structure tests/fixtures/structures/biotite__1aki.pdb --chain A]

The bundled checkpoints are tiny and random: the answer is noise; what is checked is that conversion is exact and that
a real sequence with its structure goes through encoder, projector and LLM to decoded text.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import biotite.structure as struc
import biotite.structure.io.pdb as pdb
import torch
from biotite.sequence import ProteinSequence
from transformers import AutoTokenizer, HfArgumentParser

from modeling_sepit import SepitForConditionalGeneration
from modeling_sepit.convert_original_sepit import convert, verify_conversion

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = ROOT / "tests" / "fixtures" / "sepit-original"
SYSTEM_PROMPT = (
    "You are a helpful biological assistant. You are able to understand the protein that the user provides, and "
    "assist the user with a variety of tasks using natural language."
)


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


def read_chain(path: str, chain: str) -> tuple[str, torch.Tensor]:
    atoms = pdb.PDBFile.read(path).get_structure(model=1)
    ca = atoms[(atoms.atom_name == "CA") & struc.filter_amino_acids(atoms) & (atoms.chain_id == chain)]
    if len(ca) == 0:
        raise ValueError(f"chain: {path} has no amino-acid residues in chain {chain!r}")
    return "".join(ProteinSequence.convert_letter_3to1(name) for name in ca.res_name), torch.tensor(ca.coord)


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

    print(f"[3/3] asking about {Path(args.structure).name} chain {args.chain}")
    sequence, ca = read_chain(args.structure, args.chain)
    protein_tokenizer = AutoTokenizer.from_pretrained(Path(args.output_dir) / "protein_tokenizer")
    text_tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    proteins = protein_tokenizer([sequence], return_tensors="pt")
    coords = torch.zeros(1, proteins.input_ids.shape[1], 3)
    coords[0, 1 : 1 + len(sequence)] = ca
    coords_mask = torch.zeros(coords.shape[:2], dtype=torch.bool)
    coords_mask[0, 1 : 1 + len(sequence)] = True
    prompt = f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{args.question} [/INST]"
    text_ids = text_tokenizer(prompt, return_tensors="pt").input_ids
    # Converted checkpoints splice every protein position at the single `<protein>` of the original prompt.
    width = proteins.input_ids.shape[1]
    protein_id = model.config.protein_token_id
    input_ids = torch.cat([torch.full((width,), protein_id) if t == protein_id else t[None] for t in text_ids[0]])[None]
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            protein_input_ids=proteins.input_ids,
            protein_attention_mask=proteins.attention_mask,
            protein_coords=coords,
            protein_coords_mask=coords_mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
    answer = text_tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    print(f"      protein: {len(sequence)} residues, {int(coords_mask.sum())} with C-alpha coordinates")
    print(f"      sequence: {sequence[:60]}...")
    print(f"      question: {args.question}")
    print(f"      answer (tiny random checkpoint): {answer!r}")
    print(f"done: converted model in {args.output_dir}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
