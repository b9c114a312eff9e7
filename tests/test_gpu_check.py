"""tools/gpu_check.sh on a machine without CUDA: every CUDA part skipped, said so, exit 0.

On a GPU machine the same script runs the `gpu`-marked tests and tools/bench/gpu_bench.py;
the FLOP counts the benchmark's utilisation figures rest on are checked here.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the real check")
def test_gpu_check_skips_cuda_parts_on_cpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDA is not available" in proc.stdout and "SKIPPED" in proc.stdout
    assert (tmp_path / "summary.txt").read_text().startswith("skipped")
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()


def test_benchmark_flop_counts_match_the_model():
    import sys

    sys.path.insert(0, str(ROOT / "tools/bench"))
    from flops import forward_flops_per_image, train_flops_per_image

    assert forward_flops_per_image(256) == pytest.approx(96.3e9, rel=2e-3)
    assert train_flops_per_image(256) == pytest.approx(289e9, rel=2e-3)
    assert forward_flops_per_image(512) == pytest.approx(4 * forward_flops_per_image(256), rel=1e-6)
