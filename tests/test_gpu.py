"""GPU path: run by tools/gpu_check.sh on a CUDA machine; skipped (with the reason) elsewhere.

What is proven on a real GPU: bf16 and fp16 autocast training steps through the trainer's own
Accelerator and step function (fp16 with a gradient scaler), `seg train` on one GPU through
`accelerate launch`, `seg predict` on a small cohort, and a model checkpoint written on the GPU
that loads on the CPU (weights_only) and predicts the same there as on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by tools/gpu_check.sh)"),
]

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from seg.data.synthetic import make_demo_dataset
    from seg.data.sharding import prepare_dataset

    root = tmp_path_factory.mktemp("gpu_data")
    raw = make_demo_dataset(root / "raw", n=48, size=64, seed=0)
    prepare_dataset(raw / "images", raw / "masks", out=root / "shards", val_split=0.25, shard_size=8,
                    workers=0, progress=False)
    return root / "shards"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_steps(precision):
    from seg.config import build_config
    from seg.training.accel import build_accelerator, to_device
    from seg.training.loop import build_training, train_step

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = build_config(overrides=[f"train.mixed_precision={precision}", "model.base_channels=8"])
    accelerator = build_accelerator(cfg)
    assert accelerator.device.type == "cuda"
    model, optimizer, loss_fn = build_training(cfg, accelerator)
    if precision == "fp16":
        assert accelerator.scaler is not None, "fp16 must train with a gradient scaler"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images = to_device(torch.randn(4, 3, 64, 64), accelerator.device, True)
    masks = to_device((torch.rand(4, 1, 64, 64) > 0.7).float(), accelerator.device, False)
    losses = [float(train_step(accelerator, model, optimizer, loss_fn, images, masks, 1.0)) for _ in range(5)]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], f"{precision} steps did not lower the loss on a fixed batch: {losses}"
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no weight changed"


def test_seg_train_one_gpu_through_accelerate_launch(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
           "-m", "seg.train", "--config", str(ROOT / "configs/cpu-smoke.yaml"), "--data_dir", str(shards),
           "--checkpoint_dir", str(run), "--epochs", "2", "train.mixed_precision=bf16", "data.num_workers=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("config.yaml", "history.csv", "best_model.pth", "final_model.pth", "training_history.png"):
        assert (run / name).is_file(), name
    assert "cuda" in (proc.stdout + proc.stderr).lower()


def _checkpoint_from_gpu(path: Path) -> None:
    from seg.checkpoint import model_checkpoint, save_checkpoint
    from seg.model import UNet

    torch.manual_seed(0)
    model = UNet(3, 8).cuda().train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    for _ in range(3):  # move BatchNorm statistics away from their initial values
        model(x).mean().backward()
        opt.step()
        opt.zero_grad()
    pre = {"image_size": 64, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "sampling": "resize"}
    save_checkpoint(model_checkpoint(model.eval(), pre), path)


def test_checkpoint_round_trip_gpu_cpu(tmp_path):
    from seg.checkpoint import load_model

    path = tmp_path / "gpu_model.pth"
    _checkpoint_from_gpu(path)
    assert all(t.device.type == "cpu" for t in torch.load(path, weights_only=True)["state_dict"].values())
    cpu_model, _ = load_model(path, map_location="cpu")
    gpu_model, _ = load_model(path, map_location="cuda")
    gpu_model = gpu_model.cuda()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        on_cpu = torch.sigmoid(cpu_model(x))
        on_gpu = torch.sigmoid(gpu_model(x.cuda())).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=2e-3), (on_cpu - on_gpu).abs().max()


def test_seg_predict_small_cohort_on_gpu(tmp_path):
    import cv2

    ckpt = tmp_path / "model.pth"
    _checkpoint_from_gpu(ckpt)
    images = tmp_path / "cohort"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        cv2.imwrite(str(images / f"img_{i:03d}.png"), rng.integers(0, 256, (48 + i, 64, 3), dtype=np.uint8))
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "seg.predict", "--model_path", str(ckpt), "--image_dir", str(images),
           "--output_dir", str(out), "--device", "cuda", "--batch_size", "8", "--num_workers", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    masks = sorted(out.rglob("*_mask.png"))
    assert len(masks) == 24
    for i, m in enumerate(sorted(masks)):
        arr = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
        assert arr.shape == (48 + i, 64) and set(np.unique(arr)) <= {0, 255}
