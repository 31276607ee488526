"""tools/gpu_check --dry-run: the GPU check's plumbing, on the CPU.

On a GPU the script is run by hand (docs/benchmarks.md); here its dry run
must produce the report a cut-off GPU run would leave behind: versions, the
test summary and the benchmark table, row by row, in $OUT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform != "linux", reason="a bash script")
def test_gpu_check_dry_run_writes_its_report(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    run = subprocess.run(["bash", "tools/gpu_check", "--dry-run", "--budget", "150"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "Tests (" in report and "2 passed" in report
    assert "| shape (N, D, V) | inputs | method |" in report
    rows = [line for line in report.splitlines() if line.startswith("| tiny")]
    assert [row.split(" | ")[2] for row in rows] == ["ours", "eager", "liger"]
    ours = rows[0].split(" | ")
    assert len(ours[10].split(" / ")) == 4  # fwd, dE, dC, dE+dC kernel times
    assert "needs CUDA" in rows[2]
    assert (tmp_path / "tests.log").exists()


def test_cuda_kernels_compile_without_a_gpu(tmp_path):
    """tools/compile_kernels.py lowers every CUDA kernel for sm_90 (ptxas
    included), catching what only a compiler sees before device time."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "tools/compile_kernels.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("B shared") == 8
