"""Run transformers' common tests for SEPIT and, as controls, for LLaVA and Llama; print pass/fail/skip counts.

    TRANSFORMERS_TESTS_DIR=/path/to/transformers .venv/bin/python tests/transformers_common/run_common_tests.py \
        [--models sepit llava llama] [--output-dir DIR] [-- extra pytest arguments]

SEPIT's tests (this folder) run from this repository; the controls run from the fetched suite's folder, with its own
conftest.py and pyproject.toml, exactly as transformers runs them: a pytest process per test file. The counts give one
outcome per test (parametrized cases counted separately), recorded by the `outcome_recorder` plugin here: a test that
passes with some skipped subtests counts as passed, one with a failing subtest as failed ("no report": a file whose
pytest run recorded nothing). pytest's own summary line, which also counts subtests, is printed per file. Logs, JUnit
XML and the recorded outcomes go to `--output-dir`.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from outcome_recorder import ENV_VAR as OUTCOMES_ENV_VAR

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Test files per model: SEPIT's relative to this repository, the controls' relative to the fetched suite.
MODELS = {
    "sepit": [
        "tests/transformers_common/test_modeling_sepit_common.py",
        "tests/transformers_common/test_processing_sepit_common.py",
    ],
    "llava": [
        "tests/models/llava/test_modeling_llava.py",
        "tests/models/llava/test_configuration_llava.py",
        "tests/models/llava/test_processing_llava.py",
    ],
    "llama": ["tests/models/llama/test_modeling_llama.py"],
}
SUMMARY = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "no report")


def run_model(model: str, suite: Path, output_dir: Path, extra: list[str]) -> tuple[Counter, list[str]]:
    """Run one model's common tests with pytest, a process per test file (an internal error in one, e.g. a test class
    whose setup needs the Hub, does not end the others); return the outcome counts and the failing tests."""
    cwd = ROOT if model == "sepit" else suite
    python_path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    counts: Counter = Counter()
    failures: list[str] = []
    for path in MODELS[model]:
        name = f"{model}-{Path(path).stem}"
        outcomes_file = output_dir / f"{name}.outcomes.json"
        outcomes_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "TRANSFORMERS_TESTS_DIR": str(suite),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": python_path,
            OUTCOMES_ENV_VAR: str(outcomes_file),
        }
        command = [sys.executable, "-m", "pytest", str(cwd / path), "-p", "no:cacheprovider", "-p", "outcome_recorder"]
        command += ["-rfE", f"--junitxml={output_dir / f'{name}.xml'}", *extra]
        with open(output_dir / f"{name}.log", "w") as log:
            subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        outcomes = json.loads(outcomes_file.read_text()) if outcomes_file.is_file() else {}
        if not outcomes:
            print(f"{model}: {path}: no test outcome recorded; see {output_dir / f'{name}.log'}")
            counts["no report"] += 1
            continue
        counts.update(outcomes.values())
        failures += [
            f"{outcome.upper()} {test}" for test, outcome in outcomes.items() if outcome in ("failed", "error")
        ]
        print(f"{model}: {path}: pytest says: {pytest_summary(output_dir / f'{name}.log')}")
    return counts, failures


def pytest_summary(log: Path) -> str:
    """pytest's own last summary line (which counts subtests too)."""
    lines = [line.strip("= \n") for line in log.read_text(errors="replace").splitlines()]
    found = [line for line in lines if SUMMARY.search(line)]
    return found[-1] if found else "(no summary line)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--output-dir", type=Path, default=Path("common-test-results"))
    parser.add_argument("pytest_args", nargs="*", help="after `--`: extra pytest arguments (e.g. -k, -x)")
    args = parser.parse_args()
    suite_dir = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if not suite_dir or not (Path(suite_dir) / "tests" / "test_modeling_common.py").is_file():
        raise SystemExit("set TRANSFORMERS_TESTS_DIR to a transformers checkout (tests/transformers_common/README.md)")
    suite = Path(suite_dir).resolve()
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for model in args.models:
        counts, failures = run_model(model, suite, output_dir, args.pytest_args)
        rows.append((model, counts))
        for failure in failures:
            print(f"{model}: {failure}")
    print(f"\n{'model':<8}" + "".join(f"{name:>10}" for name in OUTCOMES) + f"{'total':>10}")
    for model, counts in rows:
        print(f"{model:<8}" + "".join(f"{counts[name]:>10}" for name in OUTCOMES) + f"{sum(counts.values()):>10}")
    print(f"\nLogs, JUnit XML and recorded outcomes: {output_dir}")


if __name__ == "__main__":
    main()
