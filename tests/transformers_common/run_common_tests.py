"""Run transformers' common tests for SEPIT and, as controls, for LLaVA and Llama; print pass/fail/skip counts.

    TRANSFORMERS_TESTS_DIR=/path/to/transformers .venv/bin/python tests/transformers_common/run_common_tests.py \
        [--models sepit llava llama] [--output-dir DIR] [-- extra pytest arguments]

SEPIT's tests (this folder) run from this repository; the controls run from the fetched suite's folder, with its own
conftest.py and pyproject.toml, exactly as transformers runs them. Each run writes a JUnit XML file and a log to
`--output-dir`, one pair per test file; the counts come from the XML (one row per test, parametrized cases counted
separately; "no report": a file whose pytest run ended without one).
"""

import argparse
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

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
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "no report")


def outcome(case: ET.Element) -> str:
    """The outcome of one JUnit <testcase>."""
    if case.find("failure") is not None:
        return "failed"
    if case.find("error") is not None:
        return "error"
    skipped = case.find("skipped")
    if skipped is not None:
        return "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
    return "passed"


def count_outcomes(junit_xml: Path) -> tuple[Counter, list[str]]:
    """Outcome counts and the ids of failed / errored tests, from a JUnit XML report."""
    counts: Counter = Counter()
    failures = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        result = outcome(case)
        counts[result] += 1
        if result in ("failed", "error"):
            failures.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failures


def run_model(model: str, suite: Path, output_dir: Path, extra: list[str]) -> tuple[Counter, list[str]]:
    """Run one model's common tests with pytest, a process per test file (an internal error in one, e.g. a test class
    whose setup needs the Hub, does not end the others); return the outcome counts and the failing tests."""
    cwd = ROOT if model == "sepit" else suite
    env = {**os.environ, "TRANSFORMERS_TESTS_DIR": str(suite), "HF_HUB_OFFLINE": "1"}
    counts: Counter = Counter()
    failures: list[str] = []
    for path in MODELS[model]:
        name = f"{model}-{Path(path).stem}"
        junit_xml = output_dir / f"{name}.xml"
        junit_xml.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", str(cwd / path), "-p", "no:cacheprovider", "-rfE"]
        command += [f"--junitxml={junit_xml}", *extra]
        with open(output_dir / f"{name}.log", "w") as log:
            subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        if not junit_xml.is_file():
            print(f"{model}: {path}: pytest wrote no report (internal error?); see {output_dir / f'{name}.log'}")
            counts["no report"] += 1
            continue
        file_counts, file_failures = count_outcomes(junit_xml)
        counts.update(file_counts)
        failures += file_failures
        print(f"{model}: {path}: pytest says: {pytest_summary(output_dir / f'{name}.log')}")
    return counts, failures


def pytest_summary(log: Path) -> str:
    """pytest's own last summary line (it counts subtests and xpassed tests, which the JUnit rows fold in)."""
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
            print(f"{model}: FAILED {failure}")
    print(f"\n{'model':<8}" + "".join(f"{name:>10}" for name in OUTCOMES) + f"{'total':>10}")
    for model, counts in rows:
        print(f"{model:<8}" + "".join(f"{counts[name]:>10}" for name in OUTCOMES) + f"{sum(counts.values()):>10}")
    print(f"\nJUnit XML and logs: {output_dir}")


if __name__ == "__main__":
    main()
