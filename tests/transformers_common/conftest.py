"""Runs transformers' own common test mixins (ModelTesterMixin, GenerationTesterMixin, ConfigTester,
ProcessorTesterMixin) against SEPIT.

The mixins are not shipped with the transformers wheel: they live in the `tests/` folder of the transformers
repository. Point `TRANSFORMERS_TESTS_DIR` at a checkout (or an extracted copy) of it, the folder holding `tests/` and
`utils/`; without it every test module here is reported as skipped, never imported, so the normal suite and CI never
need it (see README.md here).
"""

import os
import sys
import warnings
from pathlib import Path

import pytest

ENV_VAR = "TRANSFORMERS_TESTS_DIR"
# Marks the fetched mixins use (transformers registers them in its own pyproject.toml / conftest.py).
SUITE_MARKS = (
    "generate",
    "is_training_test",
    "is_tensor_parallel_test",
    "is_expert_parallel_test",
    "is_fsdp_test",
    "torch_compile_test",
    "torch_export_test",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "all_flash_attn_test",
    "executorch_export_test",
    "onnx_export_test",
    "timeout",
)


def _suite_location() -> tuple[Path | None, str]:
    """The fetched suite's root, or None and why it cannot be used."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None, f"{ENV_VAR} is not set: point it at a transformers checkout holding tests/test_modeling_common.py"
    root = Path(value).expanduser().resolve()
    if not (root / "tests" / "test_modeling_common.py").is_file():
        return None, f"{ENV_VAR}={value}: no tests/test_modeling_common.py there (see tests/transformers_common/README)"
    return root, ""


def _use_suite(root: Path) -> None:
    """Make the fetched suite importable and set what transformers' own conftest.py sets for it."""
    # `tests` must resolve to the fetched suite: this repository's `tests/` is not a package, and a regular package
    # found anywhere on sys.path wins over namespace directories. `utils/` holds helpers its modules import
    # (`fetch_hub_objects_for_ci`, `test_module`).
    for entry in (root / "utils", root):
        if str(entry) not in sys.path:
            sys.path.insert(0, str(entry))
    warnings.simplefilter(action="ignore", category=FutureWarning)
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


SUITE_ROOT, SKIP_REASON = _suite_location()
if SUITE_ROOT is not None:
    _use_suite(SUITE_ROOT)


class _SkippedModule(pytest.Module):
    """A test module of this folder when the suite is missing: reported as skipped, never imported."""

    def collect(self) -> list:
        pytest.skip(f"transformers common tests: {SKIP_REASON}")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Skip every test module here, without importing it, when the fetched suite is not available."""
    if SUITE_ROOT is None:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Register the marks the fetched mixins use, so they do not warn."""
    for mark in SUITE_MARKS:
        config.addinivalue_line("markers", f"{mark}: transformers common-test mark")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which suite and which SEPIT code the run uses (SEPIT is imported from the repository the tests run in)."""
    if SUITE_ROOT is None:
        return [f"transformers common tests: skipped ({SKIP_REASON})"]
    import transformers

    import modeling_sepit

    return [
        f"transformers common tests: suite {SUITE_ROOT}, transformers {transformers.__version__}",
        f"SEPIT code under test: {Path(modeling_sepit.__file__).parent}",
    ]
