"""GPU benchmarks for tools/gpu_check.sh: the 31M U-Net at 512x512 against the hardware limit.

Measured in one run, on one GPU:
  * bf16 matrix-product rate (8192^3 matmuls): the practical ceiling used for utilisation;
  * training: seg's training step (bf16 autocast, channels_last, Adam, combined loss) on
    device-resident batches, images/s for each batch size until out of memory; the best one
    is reported with its model FLOP utilisation (MFU = images/s x FLOP per training image /
    matmul rate; FLOPs counted by FlopCounterMode, see flops.py);
  * data loading's share of step time: `seg train` as a real process (accelerate launch, one
    GPU) on generated 512 px shards at that batch size; the trainer's history.csv records the
    seconds spent waiting for batches;
  * prediction: `seg predict` as a whole process (start-up included) on a generated cohort of
    256x256 PNG images, images/s, and its steady-state MFU.
Writes gpu_bench.json and a markdown table (gpu_table.md) under --out and prints the table.

    python tools/bench/gpu_bench.py --out OUT [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import forward_flops_per_image, train_flops_per_image  # noqa: E402


def matmul_tflops(n: int = 8192, iters: int = 30) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
    return best


def train_step_rate(batch: int, side: int, steps: int = 12) -> float:
    """Images/s of seg's training step on device-resident random batches (no data loading)."""
    import torch

    from seg.losses import build_loss
    from seg.model import UNet

    torch.backends.cudnn.benchmark = True
    model = UNet(3, 64).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = build_loss("combined")
    x = torch.randn(batch, 3, side, side, device="cuda").contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, side, side, device="cuda") > 0.7).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def best_batch(side: int, candidates=(4, 8, 16, 32, 48, 64)) -> tuple[int, float, dict]:
    import torch

    rates = {}
    for b in candidates:
        try:
            rates[b] = train_step_rate(b, side)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    best = max(rates, key=rates.get)
    return best, rates[best], rates


def make_images(folder: Path, n: int, side: int, workers: int = 8) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        rng = np.random.default_rng(i)
        img = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"img_{i:06d}.png"), img)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, range(n)))


def save_random_checkpoint(path: Path, side: int) -> None:
    from seg.checkpoint import model_checkpoint, save_checkpoint
    from seg.model import UNet

    pre = {"image_size": side, "in_channels": 3, "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "sampling": "resize"}
    save_checkpoint(model_checkpoint(UNet(3, 64), pre), path)


def predict_rate(work: Path, n: int, side: int, batch: int) -> dict:
    images = work / "cohort"
    make_images(images, n, side)
    ckpt = work / "model_256.pth"
    save_random_checkpoint(ckpt, side)
    cmd = [sys.executable, "-m", "seg.predict", "--model_path", str(ckpt), "--image_dir", str(images),
           "--output_dir", str(work / "pred"), "--batch_size", str(batch),
           "--num_workers", str(min(12, os.cpu_count() or 4)), "--device", "cuda"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"seg predict failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "log_tail": proc.stderr[-1500:]}


def train_process(work: Path, side: int, batch: int, n: int) -> dict:
    """`seg train` through accelerate launch on generated shards; images/s and data-wait share."""
    from seg.data.synthetic import make_demo_dataset
    from seg.data.sharding import prepare_dataset

    raw = make_demo_dataset(work / "raw", n=n, size=side, seed=0)
    shards = work / "shards"
    prepare_dataset(raw / "images", raw / "masks", out=shards, val_split=0.1, shard_size=max(8, n // 32),
                    progress=False)
    run = work / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
           "-m", "seg.train", "--data_dir", str(shards), "--checkpoint_dir", str(run), "--epochs", "2",
           "--batch_size", str(batch), "--image_size", str(side), "--num_workers", str(min(12, os.cpu_count() or 4)),
           "train.save_every=0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"seg train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader(open(run / "history.csv")))
    last = rows[-1]
    out = {"seconds": seconds, "epochs": len(rows), "images_per_s": float(last.get("images_per_s", "nan"))}
    for key in ("data_seconds", "data_wait_fraction"):
        if key in last:
            out[key] = float(last[key])
    if "data_seconds" in last and "train_seconds" in last:
        out["data_share"] = float(last["data_seconds"]) / max(1e-9, float(last["train_seconds"]))
    elif "data_wait_fraction" in last:
        out["data_share"] = float(last["data_wait_fraction"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--quick", action="store_true", help="smaller cohorts (for a smoke run)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available: GPU benchmarks skipped")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res["matmul_bf16_tflops"] = peak = matmul_tflops()
    print(f"bf16 matmul: {peak:.0f} TFLOP/s", flush=True)

    side = 512
    f_train = train_flops_per_image(side)
    b, rate, rates = best_batch(side)
    res["train_step"] = {"side": side, "best_batch": b, "images_per_s": rate, "rates": rates,
                         "mfu": rate * f_train / (peak * 1e12)}
    print(f"train step 512px: {rates} -> best batch {b}: {rate:.1f} img/s, MFU {res['train_step']['mfu']:.1%}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            res["train_process"] = tp = train_process(work / "train", side, b, n=256 if args.quick else 1024)
            tp["mfu"] = tp["images_per_s"] * f_train / (peak * 1e12)
            print(f"seg train process: {tp}", flush=True)
        except Exception as exc:  # report and go on to prediction: one table, all findings
            res["train_process"] = {"error": str(exc)[-2000:]}
            print(f"seg train process FAILED: {exc}", flush=True)
        try:
            n = 1000 if args.quick else 4000
            res["predict"] = pr = predict_rate(work / "predict", n, 256, batch=64)
            pr["mfu"] = pr["images_per_s"] * forward_flops_per_image(256) / (peak * 1e12)
            print(f"seg predict process: {pr['images_per_s']:.0f} img/s ({n} images, {pr['seconds']:.1f} s)", flush=True)
        except Exception as exc:
            res["predict"] = {"error": str(exc)[-2000:]}
            print(f"seg predict FAILED: {exc}", flush=True)

    rows = [
        ("bf16 matmul rate", f"{peak:.0f} TFLOP/s", ""),
        (f"train step, 512px, batch {b}", f"{rate:.1f} img/s", f"MFU {res['train_step']['mfu']:.1%} (target >= 40%)"),
    ]
    tp = res.get("train_process", {})
    if "images_per_s" in tp:
        share = f", data wait {tp['data_share']:.1%} of step time (target <= 5%)" if "data_share" in tp else ""
        rows.append(("`seg train` process, 512px", f"{tp['images_per_s']:.1f} img/s", f"MFU {tp['mfu']:.1%}{share}"))
    pr = res.get("predict", {})
    if "images_per_s" in pr:
        rows.append(("`seg predict` process, 256px", f"{pr['images_per_s']:.0f} img/s",
                     f"MFU {pr['mfu']:.1%} incl. start-up (target >= 1000 img/s)"))
    table = "| measurement | result | against the limit |\n|---|---|---|\n" + "\n".join(f"| {a} | {b_} | {c} |" for a, b_, c in rows)
    table = f"GPU: {res['device']} (torch {res['torch']})\n\n" + table
    print("\n" + table)
    (out / "gpu_table.md").write_text(table + "\n")
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
