"""The C kernel under AddressSanitizer.

The feature tests that reach `features._kernel` run again in a child process whose kernel is
built with `-fsanitize=address`: an out-of-bounds read or write, which can pass unnoticed in a
normal build, fails them. Skipped where gcc or its libasan is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tests that reach the kernel (on the compiled kernel only: FRAUD_TEST_KERNELS below).
TESTS = "any_buffer or refuses or bit_for_bit or window_edges or long_key or append"


def sanitizer() -> tuple[str, str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build the kernel with AddressSanitizer")
    asan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan) or not os.path.exists(asan):
        pytest.skip("gcc has no libasan")
    return gcc, asan


def test_the_kernel_tests_pass_under_address_sanitizer(tmp_path: Path) -> None:
    gcc, asan = sanitizer()
    shutil.copytree(
        ROOT / "features", tmp_path / "features", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    shutil.copytree(ROOT / "testkit", tmp_path / "testkit", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_features.py", tmp_path / "tests")
    built = tmp_path / "features" / f"_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [gcc, "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fPIC", "-shared",
         f"-I{sysconfig.get_paths()['include']}", str(tmp_path / "features" / "_kernel.c"), "-o", str(built)],
        check=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "LD_PRELOAD": asan,
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'asan'}",
        "PYTHONMALLOC": "malloc",  # every Python allocation visible to the sanitizer
        # The suite runs every example on both kernels, unsanitized; here, some four times slower,
        # the compiled kernel only, on a third of each property test's examples.
        "FRAUD_TEST_KERNELS": "compiled",
        "FRAUD_TEST_EXAMPLES": "0.3",
    }
    which = subprocess.run(
        [sys.executable, "-c", "import features.aggregations as a, features._kernel as k; print(a.KERNEL, k.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert which.returncode == 0 and str(built) in which.stdout, which.stdout + which.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", TESTS, "tests/test_features.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert run.returncode == 0 and not reports, (run.stdout[-3000:], run.stderr[-3000:], reports[:3000])
    assert " passed" in run.stdout and " failed" not in run.stdout
