"""Load a Hub-ready SEPIT folder as a user without this project would, and ask it questions: `AutoModel` and
`pipeline("protein-qa")` with `trust_remote_code=True`, the code coming from the folder itself.

    python examples/reload_and_ask.py outputs/main/hub-model outputs/main/held_out_requests.json [cpu|cuda]

Each request is a protein-qa input (`question` + `sequence`, or `structure` + `chain`) with optional `reference` and
`about` fields, which are printed beside the answer.
"""

import argparse
import json
import sys

from transformers import AutoModel, pipeline


def main(folder: str, requests_file: str, device: str = "cpu") -> int:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    loaded_from = type(model).__module__
    if "modeling_sepit" in sys.modules or not loaded_from.startswith("transformers_modules"):
        raise RuntimeError(f"the model class came from {loaded_from}, not from the folder's remote code")
    print(f"AutoModel.from_pretrained -> {type(model).__name__} ({loaded_from})")
    qa = pipeline("protein-qa", model=folder, trust_remote_code=True, device=device)
    with open(requests_file, encoding="utf-8") as handle:
        requests = json.load(handle)
    for request in requests:
        shown = {key: request.pop(key, None) for key in ("reference", "about")}
        answer = qa(request, max_new_tokens=48)[0]["answer"]
        print(f"\n[{shown['about']}] {request['question']}\n  answer:    {answer!r}\n  reference: {shown['reference']}")
    return 0


if __name__ == "__main__":
    # argparse, not the project's parser: this script must run where only the folder's remote code is importable.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a Hub-ready SEPIT folder (save_hub_folder)")
    parser.add_argument("requests_file", help="JSON list of protein-qa requests")
    parser.add_argument("device", nargs="?", default="cpu", help="cpu or cuda (default: cpu)")
    parser.print_usage = lambda file=None: None  # argument errors print one line (`--help` still shows the usage)
    arguments = parser.parse_args()
    sys.exit(main(arguments.folder, arguments.requests_file, arguments.device))
