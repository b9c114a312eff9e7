"""The trainer's device settings: cuDNN autotuning rules and DDP options, on CPU (gloo).

The CUDA side (autotuning actually on, NCCL DDP) is in tests/test_gpu.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from seg.config import build_config
from seg.training.devices import DeviceSettings, configure_cudnn

ROOT = Path(__file__).resolve().parents[1]


def test_settings_default_on_and_follow_the_config():
    cfg = build_config(flags={"train.batch_size": 2})
    assert DeviceSettings.from_config(cfg) == DeviceSettings(True, True, True)
    cfg = build_config(overrides=["train.cudnn_benchmark=false", "train.ddp_static_graph=false"])
    assert DeviceSettings.from_config(cfg) == DeviceSettings(False, True, False)


def test_cudnn_autotuning_only_for_fixed_shapes_on_cuda():
    before = torch.backends.cudnn.benchmark
    try:
        on = DeviceSettings(True, True, True)
        assert configure_cudnn(on, torch.device("cuda"), "resize", deterministic=False)
        assert torch.backends.cudnn.benchmark
        assert not configure_cudnn(on, torch.device("cuda"), "patch", deterministic=False)  # a shape per image size
        assert not torch.backends.cudnn.benchmark
        assert not configure_cudnn(on, torch.device("cuda"), "resize", deterministic=True)
        assert not configure_cudnn(DeviceSettings(False, True, True), torch.device("cuda"), "resize", False)
        torch.backends.cudnn.benchmark = False
        assert not configure_cudnn(on, torch.device("cpu"), "resize", deterministic=False)
        assert not torch.backends.cudnn.benchmark  # the CPU leaves the flag alone
    finally:
        torch.backends.cudnn.benchmark = before


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from seg.config import build_config
    from seg.training.accel import build_accelerator, to_device
    from seg.training.loop import build_training, train_step

    accum = int(sys.argv[1])
    cfg = build_config(flags={"train.batch_size": 2, "model.base_channels": 4, "data.image_size": 32,
                              "train.grad_accum": accum, "train.mixed_precision": "no"})
    acc = build_accelerator(cfg)
    model, opt, loss_fn = build_training(cfg, acc)
    assert model.gradient_as_bucket_view and model.static_graph == (accum == 1), "DDP options not applied"
    g = torch.Generator().manual_seed(acc.process_index)
    losses = []
    for _ in range(4 * accum):
        x = to_device(torch.randn(2, 3, 32, 32, generator=g), acc.device, True)
        y = to_device((torch.rand(2, 1, 32, 32, generator=g) > 0.5).float(), acc.device, True)
        losses.append(float(train_step(acc, model, opt, loss_fn, x, y, 1.0)))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "ranks diverged"
    print("OK", acc.process_index, losses[0], losses[-1], flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_trains_with_bucket_views_and_static_graph(tmp_path, accum):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(accum)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("OK") == 2
