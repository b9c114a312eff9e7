"""GPU path: run by tools/gpu_check.sh on a CUDA machine; skipped (with the reason) elsewhere.

What is proven on a real GPU: bf16 and fp16 autocast training steps through the trainer's own
Accelerator and step function (fp16 with a gradient scaler), `seg train` on one GPU through
`accelerate launch`, `seg predict` on a small cohort, and a model checkpoint written on the GPU
that loads on the CPU (weights_only) and predicts the same there as on the GPU. Keeping the GPU
fed: prediction's device path (resize, threshold and counts on the GPU) gives the CPU path's
outputs, decoded chunks arrive pinned and batches launch asynchronously, a torch.compile'd
prediction agrees with eager, training turns cuDNN autotuning on and gets pinned batches.
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


# ---- keeping the GPU fed: the device path of prediction, pinned memory, autotuning ------------

def test_prediction_device_path_on_gpu_matches_the_cpu_path(tmp_path):
    import cv2

    from seg.inference.engine import Predictor
    from seg.inference.inputs import build_units
    from seg.config.inference import PredictConfig
    from seg.inference.runner import CohortRun

    ckpt = tmp_path / "model.pth"
    _checkpoint_from_gpu(ckpt)
    images = tmp_path / "cohort"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        img = cv2.GaussianBlur(rng.integers(0, 256, (40 + 3 * i, 70 - i, 3), dtype=np.uint8), (7, 7), 0)
        cv2.imwrite(str(images / f"img_{i:03d}.png"), img)
    units = build_units(str(images), None, None, 8)
    outs = {}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions on both sides
    for device in ("cuda", "cpu"):
        p = Predictor(ckpt, device=device, precision="fp32", batch_size=8)
        run = CohortRun(p, units, 0, 1, PredictConfig(output_dir=str(tmp_path / device), save_probability=True,
                                                      num_workers=2, writer_threads=2, progress=False, qc=False))
        assert run.batches.device_post == (device == "cuda")
        assert run.run()["images"] == 30
        outs[device] = sorted((tmp_path / device).rglob("*.png"))
    torch.backends.cudnn.allow_tf32 = tf32
    assert [p.name for p in outs["cuda"]] == [p.name for p in outs["cpu"]] and len(outs["cpu"]) == 60
    for a, b in zip(outs["cuda"], outs["cpu"]):
        x = cv2.imread(str(a), cv2.IMREAD_UNCHANGED).astype(np.int64)
        y = cv2.imread(str(b), cv2.IMREAD_UNCHANGED).astype(np.int64)
        assert x.shape == y.shape
        if a.name.endswith("_prob.png"):  # fp32 on cuDNN vs oneDNN: close, not equal
            assert np.abs(x - y).max() <= 65535 * 1e-4, a.name
        else:
            assert (x != y).mean() < 5e-3, a.name


def test_decoding_threads_pin_chunks_and_batches_launch_asynchronously(tmp_path):
    import cv2

    from seg.inference.device import BatchForward, Launched
    from seg.inference.engine import Predictor
    from seg.inference.inputs import build_units
    from seg.inference.loader import Chunk, UnitStream, record_loader

    ckpt = tmp_path / "model.pth"
    _checkpoint_from_gpu(ckpt)
    (tmp_path / "in").mkdir()
    for i in range(6):
        cv2.imwrite(str(tmp_path / "in" / f"{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
    p = Predictor(ckpt, device="cuda", precision="bf16", batch_size=4)
    stream = UnitStream(build_units(str(tmp_path / "in"), None, None, 3), p.preprocessor, chunk=4)
    chunks = [r for r in record_loader(stream, num_workers=2, pin_memory=True) if isinstance(r, Chunk)]
    assert chunks and all(c.x.is_pinned() for c in chunks)
    forward = BatchForward(p)
    assert torch.backends.cudnn.benchmark  # fixed shapes in resize mode
    launched = forward.launch(chunks[0].x, list(chunks[0].sizes))
    assert isinstance(launched, Launched)
    out = launched.result()
    assert out.probs is None and len(out.masks) == len(chunks[0].sizes)
    assert all(m.dtype == np.uint8 and m.shape == (64, 64) for m in out.masks)
    assert out.counts == [int((m > 0).sum()) for m in out.masks]


@pytest.mark.timeout(170)
def test_compiled_prediction_matches_eager_on_gpu(tmp_path):
    from seg.inference.device import BatchForward
    from seg.inference.engine import Predictor

    ckpt = tmp_path / "model.pth"
    _checkpoint_from_gpu(ckpt)
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
    eager = BatchForward(Predictor(ckpt, device="cuda", precision="bf16", batch_size=8)).launch(raw, [(64, 64)] * 5).result()
    compiled = BatchForward(Predictor(ckpt, device="cuda", precision="bf16", batch_size=8), compile="default")
    assert compiled.pad_to == 8
    out = compiled.launch(raw, [(64, 64)] * 5).result()
    assert len(out.masks) == 5
    differ = np.mean([(a != b).mean() for a, b in zip(out.masks, eager.masks)])
    assert differ < 0.01, differ  # bf16 kernels differ in rounding only


def test_training_on_gpu_autotunes_and_pins_batches(shards):
    from seg.config import build_config
    from seg.training.accel import build_accelerator
    from seg.training.loaders import DataSpec, train_loader

    torch.backends.cudnn.benchmark = False
    cfg = build_config(flags={"data.data_dir": str(shards), "data.image_size": 64, "train.batch_size": 4,
                              "data.num_workers": 2}, overrides=["model.base_channels=8"])
    build_accelerator(cfg)
    assert torch.backends.cudnn.benchmark
    images, masks, _ = next(iter(train_loader(cfg, DataSpec(cfg), epoch=0, rank=0, world_size=1)))
    assert images.is_pinned() and masks.is_pinned()  # so to_device's non_blocking copy is asynchronous
