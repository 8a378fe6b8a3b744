"""Ask a SEPIT model a question about a real protein from a structure file.

    python examples/ask.py --model outputs/main/hub-model --structure examples/data/4hhb.pdb \\
        --chain A --question "What is the function of <protein> ?"
"""

from dataclasses import dataclass, field

from transformers import pipeline

import modeling_sepit  # noqa: F401  (registers the "protein-qa" pipeline)
from modeling_sepit.cli_sepit import script_parser


@dataclass
class AskArguments:
    model: str = field(metadata={"help": "A SEPIT folder or Hub id (model + processor)."})
    structure: str = field(metadata={"help": "PDB / mmCIF file, optionally gzipped (AlphaFold DB files too)."})
    question: str = field(default="What is the function of <protein> ?", metadata={"help": "The question."})
    chain: str | None = field(default=None, metadata={"help": "Author chain id, when the file has several."})
    sequence: str | None = field(default=None, metadata={"help": "Full sequence, when the structure covers part."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length limit of the answer."})


def main() -> None:
    (args,) = script_parser([AskArguments], __doc__).parse_args_into_dataclasses()
    qa = pipeline("protein-qa", model=args.model, trust_remote_code=True)
    request = {"question": args.question, "structure": args.structure, "chain": args.chain, "sequence": args.sequence}
    print(qa({k: v for k, v in request.items() if v is not None}, max_new_tokens=args.max_new_tokens)[0]["answer"])


if __name__ == "__main__":
    main()
