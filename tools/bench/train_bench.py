"""CPU training benchmark: `seg train`'s step and process against the reference recipe.

Part 1, steps (one process, 256x256, batch 4, the full 31M U-Net, random inputs, no data loading):
  (a) the reference recipe as in Pytorch-UNet's train.py (``reference_train.reference_step``:
      fp32, contiguous memory, RMSprop, BCE + Dice, no autocast), and
  (b) `seg train`'s own step (``seg.training.loop.train_step`` on the model, optimizer and
      Accelerator that `seg train` builds with its defaults: bf16 autocast, channels_last, Adam,
      combined loss, clipping), including the per-step NHWC copy of the inputs,
  interleaved a, b, a, b ... so that load from other processes hits both alike; printed as
  images/s and their ratio. The step's achieved TFLOP/s (FLOPs per training image counted by
  FlopCounterMode, ``flops.py``: 289 GFLOP at 256 px) is compared with a bf16 matmul rate
  measured in the same run (the practical bf16 limit of this CPU).
Part 2, whole processes, start to end: ``--epochs`` (2) epochs of ``--train_images`` (40)
  training images at 256x256 with `python -m seg.train` (defaults, batch 4) against
  ``reference_train.py`` on the same images and the same validation images; both train every
  image once per epoch (a last partial batch where the count is not a multiple of 4, in both),
  printed as "images trained". ``--process_rounds`` > 1 repeats the pair (reference, seg
  train), interleaved, and reports the best time of each.

    python tools/bench/train_bench.py [--rounds 3 --steps 2] [--skip_process] [--json OUT.json]
    python tools/bench/train_bench.py --skip_steps --epochs 2 --train_images 40 [--process_rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from flops import train_flops_per_image  # noqa: E402
from reference_train import reference_optimizer, reference_step  # noqa: E402

SIDE, BATCH = 256, 4


def matmul_tflops(dtype: torch.dtype, n: int = 2048, iters: int = 6) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, SIDE, SIDE, generator=g)
    y = (torch.nn.functional.avg_pool2d(torch.rand(BATCH, 1, SIDE // 8, SIDE // 8, generator=g), 3, 1, 1) > 0.5)
    return x, torch.nn.functional.interpolate(y.float(), size=(SIDE, SIDE))


def reference_runner():
    from seg.model import UNet

    torch.manual_seed(0)
    model = UNet(3, 64).train()
    optimizer = reference_optimizer(model)
    x, y = make_batch()
    return lambda: reference_step(model, optimizer, x, y)


def seg_runner():
    from seg.config import build_config
    from seg.training.accel import build_accelerator, to_device
    from seg.training.loop import build_training, train_step

    cfg = build_config(flags={"data.image_size": SIDE, "train.batch_size": BATCH})
    accelerator = build_accelerator(cfg)
    model, optimizer, loss_fn = build_training(cfg, accelerator)
    model.train()
    x, y = make_batch()
    t = cfg.train

    def step():
        images = to_device(x, accelerator.device, t.channels_last)
        masks = to_device(y, accelerator.device, t.channels_last)
        return train_step(accelerator, model, optimizer, loss_fn, images, masks, t.grad_clip)

    return step, accelerator.mixed_precision


def step_benchmark(rounds: int, steps: int) -> dict:
    ref = reference_runner()
    seg, precision = seg_runner()
    ref(), seg()  # warm-up (oneDNN primitive creation, allocator)
    times = {"reference": [], "seg": []}
    for r in range(rounds):
        for name, fn in (("reference", ref), ("seg", seg)):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            rate = BATCH * steps / (time.perf_counter() - t0)
            times[name].append(rate)
            print(f"round {r + 1}/{rounds} {name:>9}: {rate:.3f} img/s", flush=True)
    flop = train_flops_per_image(SIDE)
    bf16, fp32 = matmul_tflops(torch.bfloat16), matmul_tflops(torch.float32)
    ref_rate, seg_rate = statistics.median(times["reference"]), statistics.median(times["seg"])
    return {"side": SIDE, "batch": BATCH, "threads": torch.get_num_threads(), "seg_precision": precision,
            "reference_img_s": ref_rate, "seg_img_s": seg_rate, "ratio": seg_rate / ref_rate, "rates": times,
            "gflop_per_train_image": flop / 1e9, "seg_tflops": seg_rate * flop / 1e12,
            "reference_tflops": ref_rate * flop / 1e12, "bf16_matmul_tflops": bf16, "fp32_matmul_tflops": fp32,
            "bf16_limit_img_s": bf16 * 1e12 / flop, "seg_fraction_of_bf16_limit": seg_rate * flop / (bf16 * 1e12)}


def make_data(work: Path, n_train: int) -> tuple[Path, Path, list[str]]:
    """Demo images at 256 px, sharded so that exactly ``n_train`` are training images."""
    from seg.data.synthetic import make_demo_dataset
    from seg.data.sharding import prepare_dataset

    for n in range(n_train + 2, n_train + 12 + n_train // 4):
        raw = make_demo_dataset(work / f"raw{n}", n=n, size=SIDE, seed=0)
        shards = work / f"shards{n}"
        info = prepare_dataset(raw / "images", raw / "masks", out=shards, val_split=0.1, shard_size=4,
                               workers=0, progress=False)
        if info["splits"]["train"]["count"] == n_train and info["splits"]["val"]["count"] > 0:
            val = []
            for shard in info["splits"]["val"]["shards"]:
                with tarfile.open(shards / shard["name"]) as tar:
                    val += sorted({m.split(".")[0] for m in tar.getnames()})
            return raw, shards, val
    raise RuntimeError(f"no demo set size gave exactly {n_train} training images")


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def process_benchmark(work: Path, n_train: int, epochs: int, rounds: int = 1) -> dict:
    raw, shards, val = make_data(work, n_train)
    (work / "val.txt").write_text("\n".join(val) + "\n")
    ref_cmd = [sys.executable, str(Path(__file__).with_name("reference_train.py")), "--images", str(raw / "images"),
               "--masks", str(raw / "masks"), "--val_list", str(work / "val.txt"), "--out", str(work / "ref_run"),
               "--epochs", str(epochs), "--batch_size", str(BATCH), "--size", str(SIDE)]
    seg_cmd = [sys.executable, "-m", "seg.train", "--data_dir", str(shards), "--checkpoint_dir", str(work / "seg_run"),
               "--epochs", str(epochs), "--batch_size", str(BATCH), "--image_size", str(SIDE), "--no_resume"]
    ref_times, seg_times = [], []
    for r in range(rounds):  # interleaved: other load on the machine hits both alike
        ref_s, ref_out = timed(ref_cmd, ROOT)
        ref_times.append(ref_s)
        print(f"round {r + 1}: reference_train.py {ref_s:.1f} s | {ref_out.strip().splitlines()[-2]}", flush=True)
        seg_s, seg_out = timed(seg_cmd, ROOT)
        seg_times.append(seg_s)
        print(f"round {r + 1}: seg train          {seg_s:.1f} s | {seg_out.strip().splitlines()[-1]}", flush=True)
    # images actually trained by each (equal for a fair comparison: the reference's DataLoader
    # keeps its last partial batch, seg train cuts its last batch to the rest of the set)
    ref_images = sum(int(line.split(" images,")[0].split()[-1]) for line in ref_out.splitlines() if " images," in line)
    with open(work / "seg_run" / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    seg_images = sum(round(float(row["images_per_s"]) * float(row["train_seconds"])) for row in rows)
    seg_train_s = sum(float(row["train_seconds"]) for row in rows)
    seg_data_s = sum(float(row.get("data_seconds") or 0) for row in rows)
    print(f"images trained: reference {ref_images}, seg train {seg_images}; seg train's epochs: "
          f"{seg_train_s:.1f} s in training steps (of which {seg_data_s:.1f} s waiting for data), "
          f"the rest of its {min(seg_times):.1f} s is start-up, validation and saving", flush=True)
    best_ref, best_seg = min(ref_times), min(seg_times)
    return {"train_images": n_train, "epochs": epochs, "val_images": len(val), "reference_seconds": best_ref,
            "seg_seconds": best_seg, "speedup": best_ref / best_seg, "reference_rounds": ref_times,
            "seg_rounds": seg_times, "reference_images_trained": ref_images, "seg_images_trained": seg_images,
            "seg_train_step_seconds": seg_train_s, "seg_data_wait_seconds": seg_data_s,
            "seg_command": " ".join(seg_cmd[1:]), "reference_command": " ".join(ref_cmd[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (reference, seg)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per recipe per round")
    ap.add_argument("--skip_steps", action="store_true", help="only the whole-process comparison")
    ap.add_argument("--skip_process", action="store_true", help="only the step comparison")
    ap.add_argument("--epochs", type=int, default=2, help="whole-process comparison: epochs")
    ap.add_argument("--train_images", type=int, default=40, help="whole-process comparison: training images")
    ap.add_argument("--process_rounds", type=int, default=1, help="interleaved (reference, seg train) pairs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    result = {}
    if not args.skip_steps:
        s = step_benchmark(args.rounds, args.steps)
        result["steps"] = s
        print(f"\nsteps at {SIDE}px batch {BATCH} ({s['threads']} threads): reference {s['reference_img_s']:.3f} img/s, "
              f"seg ({s['seg_precision']}, channels_last) {s['seg_img_s']:.3f} img/s -> {s['ratio']:.2f}x (target >= 2.5x)")
        print(f"seg step: {s['seg_tflops']:.3f} TFLOP/s at {s['gflop_per_train_image']:.0f} GFLOP/image; bf16 matmul "
              f"{s['bf16_matmul_tflops']:.3f} TFLOP/s = limit {s['bf16_limit_img_s']:.2f} img/s -> "
              f"{s['seg_fraction_of_bf16_limit']:.0%} of the bf16 limit (target >= 75%); fp32 matmul "
              f"{s['fp32_matmul_tflops']:.3f} TFLOP/s, reference step {s['reference_tflops']:.3f} TFLOP/s", flush=True)
    if not args.skip_process:
        with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
            p = process_benchmark(Path(tmp), args.train_images, args.epochs, args.process_rounds)
        result["process"] = p
        print(f"\nwhole process, {args.epochs} epoch(s) of {args.train_images} images at {SIDE}px: reference "
              f"{p['reference_seconds']:.1f} s, seg train {p['seg_seconds']:.1f} s -> {p['speedup']:.2f}x "
              f"(target >= 2.5x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
