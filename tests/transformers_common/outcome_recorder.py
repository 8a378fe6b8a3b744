"""pytest plugin used by run_common_tests.py (`-p outcome_recorder`): one outcome per test, written as JSON to the file
named by $COMMON_TESTS_OUTCOMES at the end of the session.

JUnit XML cannot tell a test that passed with some skipped subtests (e.g. a mixin test skipping the model classes it
does not apply to) from a skipped one; here a subtest changes its test's outcome only when it fails.
"""

import json
import os

import pytest

ENV_VAR = "COMMON_TESTS_OUTCOMES"
# When several reports concern one test, the highest rank wins.
RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 1, "failed": 2, "error": 3}
_outcomes: dict[str, str] = {}


def _outcome(report: pytest.TestReport) -> str | None:
    """What this report says of its test, or None when it says nothing (a passing or skipped subtest, teardown)."""
    if report.failed:
        return "failed" if report.when == "call" else "error"
    if getattr(report, "context", None) is not None:  # a subtest's report
        return None
    if report.when == "call" or (report.when == "setup" and report.skipped):
        if hasattr(report, "wasxfail"):
            return "xfailed" if report.skipped else "xpassed"
        return report.outcome
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome = _outcome(report)
    if outcome is not None and RANK[outcome] >= RANK[_outcomes.get(report.nodeid, "passed")]:
        _outcomes[report.nodeid] = outcome


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _outcomes[report.nodeid or "collection"] = "error"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(ENV_VAR)
    if path:
        with open(path, "w") as file:
            json.dump(_outcomes, file, indent=1)
