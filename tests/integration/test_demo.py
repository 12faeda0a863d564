"""`pgmulti demo`: the README's first command, run for real with a short pgbench."""

import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_demo_selftest_runs_pgbench_through_pgmulti():
    result = subprocess.run([sys.executable, "-m", "pgmulti", "demo", "--selftest", "--port", "0"],
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "psql -h 127.0.0.1" in result.stdout
    assert "number of failed transactions: 0" in result.stdout
    assert "tps = " in result.stdout
