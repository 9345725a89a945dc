"""Run a test module's Triton-kernel checks on CPU tensors under Triton's interpreter. Triton fixes compiled or
interpreted when it first imports a kernel, so the check runs in its own process with TRITON_INTERPRET=1."""

import os
import subprocess
import sys

import pytest


def check_interpreted(module: str) -> None:
    """Run ``module.check_cases()`` under the interpreter; it must exit 0 and print "all cases equal"."""
    pytest.importorskip("triton", reason="the Triton interpreter needs triton (pip install -e '.[dev]')")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"from {module} import check_cases; check_cases()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all cases equal" in done.stdout
