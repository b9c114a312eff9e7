"""tools/gpu_check.sh on a machine without CUDA: every CUDA part skipped, said so, exit 0.

On a GPU machine the same script runs the `gpu`-marked tests and tools/bench/gpu_bench.py;
the FLOP counts the benchmark's utilisation figures rest on are checked here, and every part
of gpu_bench.py runs on the CPU with a tiny model (``--device cpu``), so that the script the
GPU session runs once has run before.
"""

import os
import subprocess
import sys
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the real benchmark")
def test_gpu_bench_says_it_skips_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/gpu_bench.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "CUDA is not available: GPU benchmarks skipped" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_bench_runs_every_part_on_cpu(tmp_path):
    import json

    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/gpu_bench.py"), "--device", "cpu", "--out",
                           str(tmp_path), "--budget_s", "500"], capture_output=True, text=True, timeout=580,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert "error" not in res["train_process"] and "error" not in res["predict"], proc.stdout[-3000:]
    assert res["train_step"]["images_per_s"] > 0 and 0 <= res["train_process"]["data_share"] <= 1
    assert res["loader"]["per_worker"] > 0 and res["predict"]["host_img_s"] > 0 and res["predict"]["device_img_s"] > 0
    table = (tmp_path / "gpu_table.md").read_text()
    for row in ("training step", "`seg train` process", "training loader", "prediction, device alone",
                "prediction, host pipeline alone", "`seg predict` process"):
        assert row in table, row
    assert (tmp_path / "profile_train_step.txt").read_text().strip()  # the tiny CPU run misses every goal
