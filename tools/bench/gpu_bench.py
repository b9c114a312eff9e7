"""GPU benchmarks for tools/gpu_check.sh: is the GPU fed? The 31M U-Net against the hardware limit.

Measured in one run, on one GPU (every part prints as it finishes; later parts are skipped,
and say so, when --budget_s runs out):
  * bf16 matrix-product rate (8192^3 matmuls): the practical ceiling for utilisation (MFU);
  * training step: `seg train`'s own step (the Accelerator, bf16 autocast, channels_last, fused
    Adam, combined loss, clipping) on device-resident 512 px batches, images/s per batch size
    until out of memory; the best with its MFU (images/s x FLOP per training image, counted by
    FlopCounterMode in flops.py, / matmul rate), and with cuDNN autotuning off for comparison;
  * data loading's share of step time: `seg train` as a real process (accelerate launch, one
    GPU, 512 px shards, the best batch size): history.csv's seconds spent waiting for batches
    over training-step seconds; and the training loader's images/s per worker core on this
    machine (cores per GPU = step rate / that);
  * prediction at 256 px: the device alone (normalise + forward + resize/threshold on the
    device, on device-resident batches), the host pipeline alone (`seg predict`'s pipeline with
    the device half replaced by a threshold: tools/bench/host_bench.py's HostOnly), and `seg
    predict` as a whole process (start-up included, and its steady rate); the host-pipeline
    share of prediction time = 1 - steady rate / device rate (the time the device waits);
    ``torch.compile`` against eager for the fixed batch shape;
  * where a goal is missed (>= 40 % MFU, data wait <= 5 % of step time, >= 1,000 images/s for
    prediction): a profiler summary (top operators by device and host time).
Writes gpu_bench.json, gpu_table.md and profile_*.txt under --out and prints the table.
``--device cpu`` runs every part with a tiny model and tiny sizes (the test suite's check that
the script works; its figures mean nothing).

    python tools/bench/gpu_bench.py --out OUT [--budget_s 330] [--device cpu]
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
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from flops import forward_flops_per_image, train_flops_per_image  # noqa: E402
from gpu_predict import device_rate, host_rate, make_cohort, predict_process, predict_profile, save_checkpoint  # noqa: E402

GOALS = {"mfu": 0.40, "data_share": 0.05, "predict_img_s": 1000.0}


class Plan:
    """Sizes for a real GPU run, or tiny ones for the CPU smoke run."""

    def __init__(self, device: str):
        gpu = device == "cuda"
        self.device = device
        self.base = 64 if gpu else 4
        self.train_side = 512 if gpu else 64
        self.predict_side = 256 if gpu else 32
        self.batches = (8, 16, 24, 32, 48, 64) if gpu else (2, 4)
        self.train_images = 1024 if gpu else 24
        self.predict_images = 4000 if gpu else 64
        self.predict_batch = 64 if gpu else 8
        self.workers = min(12, max(2, (os.cpu_count() or 4) - 2)) if gpu else 1
        self.matmul_n = 8192 if gpu else 256


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(plan: Plan, iters: int = 30) -> float:
    import torch

    n = plan.matmul_n
    a = torch.randn(n, n, device=plan.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=plan.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(plan.device)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(plan.device)
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
    return best


def seg_step(plan: Plan, batch: int):
    """`seg train`'s step on a fixed device-resident batch (returns a no-argument callable)."""
    import torch

    from seg.config import build_config
    from seg.training.accel import build_accelerator, to_device
    from seg.training.loop import build_training, train_step

    cfg = build_config(flags={"data.image_size": plan.train_side, "train.batch_size": batch,
                              "model.base_channels": plan.base}, overrides=["train.mixed_precision=bf16"])
    accelerator = build_accelerator(cfg)
    model, optimizer, loss_fn = build_training(cfg, accelerator)
    model.train()
    x = to_device(torch.randn(batch, 3, plan.train_side, plan.train_side), accelerator.device, True)
    y = to_device((torch.rand(batch, 1, plan.train_side, plan.train_side) > 0.7).float(), accelerator.device, True)
    return lambda: train_step(accelerator, model, optimizer, loss_fn, x, y, cfg.train.grad_clip)


def step_rate(plan: Plan, batch: int, steps: int = 10, cudnn_benchmark: bool = True) -> float:
    import torch

    torch.backends.cudnn.benchmark = cudnn_benchmark
    step = seg_step(plan, batch)
    for _ in range(3):
        step()
    sync(plan.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(plan.device)
    return batch * steps / (time.perf_counter() - t0)


def best_batch(plan: Plan) -> tuple[int, float, dict]:
    import torch

    rates: dict[int, float] = {}
    for b in plan.batches:
        try:
            rates[b] = step_rate(plan, b)
            print(f"  train step batch {b}: {rates[b]:.1f} img/s", flush=True)
        except torch.OutOfMemoryError:
            break
        finally:
            import gc

            gc.collect()  # the previous batch size's model and optimizer
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    best = max(rates, key=rates.get)
    return best, rates[best], rates


def profile_summary(fn, plan: Plan, path: Path, steps: int = 3, sort: str | None = None) -> str:
    """Top operators of ``steps`` calls of ``fn`` (torch.profiler), written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])
    fn()
    sync(plan.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(plan.device)
    sort = sort or ("self_cuda_time_total" if plan.device == "cuda" else "self_cpu_time_total")
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    path.write_text(table + "\n")
    return table


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                               **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


def train_process(plan: Plan, work: Path, batch: int, timeout: float) -> dict:
    """`seg train` (accelerate launch on one GPU) on generated shards: images/s and data-wait share."""
    from seg.data.sharding import prepare_dataset
    from seg.data.synthetic import make_demo_dataset

    raw = make_demo_dataset(work / "raw", n=plan.train_images, size=plan.train_side, seed=0)
    shards = work / "shards"
    prepare_dataset(raw / "images", raw / "masks", out=shards, val_split=0.1,
                    shard_size=max(4, plan.train_images // (4 * plan.workers)), progress=False)
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16"]
              if plan.device == "cuda" else [sys.executable])
    cmd = launch + ["-m", "seg.train", "--data_dir", str(shards), "--checkpoint_dir", str(work / "run"), "--epochs", "2",
                    "--batch_size", str(batch), "--image_size", str(plan.train_side), "--num_workers", str(plan.workers),
                    f"model.base_channels={plan.base}", "train.save_every=0", "train.mixed_precision=bf16"]
    seconds, _ = run(cmd, timeout)
    rows = list(csv.DictReader(open(work / "run" / "history.csv")))
    last = rows[-1]  # the second epoch: workers and cuDNN warmed up
    return {"seconds": seconds, "images_per_s": float(last["images_per_s"]),
            "data_share": float(last["data_seconds"]) / max(1e-9, float(last["train_seconds"])), "shards": str(shards)}


def loader_rate(plan: Plan, shards: str, batch: int, seconds: float = 8.0) -> dict:
    """Training-loader images/s with ``plan.workers`` workers on this machine, and per worker."""
    from seg.config import build_config
    from seg.training.loaders import DataSpec, train_loader

    cfg = build_config(flags={"data.data_dir": shards, "data.image_size": plan.train_side, "train.batch_size": batch,
                              "data.num_workers": plan.workers})
    it = iter(train_loader(cfg, DataSpec(cfg), epoch=0, rank=0, world_size=1))
    for _ in range(plan.workers):  # every worker started
        next(it)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)[0])
    rate = n / (time.perf_counter() - t0)
    return {"images_per_s": rate, "workers": plan.workers, "per_worker": rate / plan.workers}


def render_table(res: dict) -> str:
    """The markdown table of gpu_bench.json's results (missing parts say why)."""
    rows = [(f"bf16 matmul rate ({res['matmul_n']}^3)", f"{res['matmul_tflops']:.0f} TFLOP/s", "the MFU denominator")]
    ts = res.get("train_step", {})
    if "images_per_s" in ts:
        goal = "met" if ts["mfu"] >= GOALS["mfu"] else "missed: see profile_train_step.txt"
        off = f"; cuDNN autotuning off: {ts['no_autotune_img_s']:.1f} img/s" if "no_autotune_img_s" in ts else ""
        rows.append((f"training step, {ts['side']} px bf16, batch {ts['best_batch']} (best of {sorted(ts['rates'])})",
                     f"{ts['images_per_s']:.1f} img/s", f"MFU {ts['mfu']:.1%} (goal >= 40 %: {goal}){off}"))
    tp = res.get("train_process", {})
    if "images_per_s" in tp:
        goal = "met" if tp["data_share"] <= GOALS["data_share"] else "missed"
        rows.append((f"`seg train` process, {ts.get('side')} px, 2nd epoch", f"{tp['images_per_s']:.1f} img/s",
                     f"MFU {tp['mfu']:.1%}; data wait {tp['data_share']:.1%} of step time (goal <= 5 %: {goal})"))
    elif tp:
        rows.append(("`seg train` process", "not measured", tp.get("error", "")[:200].replace("|", "/").replace("\n", " ")))
    ld = res.get("loader", {})
    if "per_worker" in ld:
        rows.append((f"training loader, {ld['workers']} workers", f"{ld['images_per_s']:.0f} img/s",
                     f"{ld['per_worker']:.1f} img/s per worker core: {ld['cores_per_gpu']:.1f} cores per GPU "
                     f"at the best step rate"))
    pr = res.get("predict", {})
    if "device_img_s" in pr:
        rows.append((f"prediction, device alone, {pr['side']} px batch {pr['batch']}", f"{pr['device_img_s']:.0f} img/s",
                     f"MFU {pr['device_mfu']:.1%}"))
    if "host_img_s" in pr:
        rows.append((f"prediction, host pipeline alone ({pr['workers']} threads)", f"{pr['host_img_s']:.0f} img/s",
                     "decode, batch, encode, write; device half replaced"))
    if "process_img_s" in pr:
        goal = "met" if pr["process_img_s"] >= GOALS["predict_img_s"] else "missed: see profile_predict.txt"
        share = f"; host-pipeline share of the time {pr['host_share']:.0%}" if "host_share" in pr else ""
        rows.append((f"`seg predict` process, {pr['images']} images", f"{pr['process_img_s']:.0f} img/s",
                     f"whole process (goal >= 1,000: {goal}); steady {pr.get('steady_img_s') or 0:.0f} img/s{share}"))
    elif "error" in pr:
        rows.append(("`seg predict` process", "not measured", pr["error"][:200].replace("|", "/").replace("\n", " ")))
    for mode, rate in res.get("compile", {}).items():
        rows.append((f"prediction, device alone, torch.compile {mode}", f"{rate:.0f} img/s",
                     f"{rate / pr['device_img_s']:.2f}x eager" if pr.get("device_img_s") else ""))
    for part in res.get("skipped", []):
        rows.append((part, "skipped", "time budget spent"))
    head = f"GPU: {res['device_name']} (torch {res['torch']}, {res['cpus']} CPUs)\n\n"
    return head + "| measurement | result | against the limit |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the tiny smoke run of every part")
    ap.add_argument("--budget_s", type=float, default=330.0, help="skip later parts past this many seconds")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: GPU benchmarks skipped")
        return 0
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    plan = Plan(args.device)
    if plan.device == "cpu":  # the smoke run shares its cores with other tests: one thread everywhere
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device_name": torch.cuda.get_device_name(0) if plan.device == "cuda" else "CPU smoke run",
                 "torch": torch.__version__, "cpus": os.cpu_count(), "skipped": []}
    res["matmul_tflops"] = peak = matmul_tflops(plan)
    res["matmul_n"] = plan.matmul_n
    print(f"bf16 matmul: {peak:.1f} TFLOP/s", flush=True)
    f_train = train_flops_per_image(plan.train_side, base_channels=plan.base)
    b, rate, rates = best_batch(plan)
    ts = res["train_step"] = {"side": plan.train_side, "best_batch": b, "images_per_s": rate, "rates": rates,
                              "mfu": rate * f_train / (peak * 1e12)}
    if plan.device == "cuda":
        ts["no_autotune_img_s"] = step_rate(plan, b, cudnn_benchmark=False)
        torch.backends.cudnn.benchmark = True
    print(f"train step {plan.train_side}px: best batch {b}: {rate:.1f} img/s, MFU {ts['mfu']:.1%}", flush=True)
    if ts["mfu"] < GOALS["mfu"]:
        print(profile_summary(seg_step(plan, b), plan, out / "profile_train_step.txt"), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if left() > 120:
            try:
                tp = res["train_process"] = train_process(plan, work / "train", b, timeout=max(60.0, left() - 60))
                tp["mfu"] = tp["images_per_s"] * f_train / (peak * 1e12)
                print(f"seg train process: {tp['images_per_s']:.1f} img/s, data wait {tp['data_share']:.1%}", flush=True)
                ld = res["loader"] = loader_rate(plan, tp.pop("shards"), b, seconds=8.0 if plan.device == "cuda" else 2.0)
                ld["cores_per_gpu"] = rate / ld["per_worker"]
                print(f"training loader: {ld['images_per_s']:.1f} img/s with {ld['workers']} workers", flush=True)
            except Exception as exc:  # report and go on: one table, all findings
                res["train_process"] = {"error": str(exc)[-2000:]}
                print(f"seg train process FAILED: {exc}", flush=True)
        else:
            res["skipped"].append("`seg train` process and loader")
        pr = res["predict"] = {"side": plan.predict_side, "batch": plan.predict_batch, "workers": plan.workers,
                               "images": plan.predict_images}
        try:
            cohort = make_cohort(work / "cohort", plan.predict_images, plan.predict_side)
            ckpt = save_checkpoint(work / "model.pth", plan)
            pr["device_img_s"] = device_rate(plan, ckpt)
            pr["device_mfu"] = pr["device_img_s"] * forward_flops_per_image(plan.predict_side, base_channels=plan.base) / (peak * 1e12)
            pr["host_img_s"] = host_rate(plan, cohort, ckpt, work / "host_out")
            p = predict_process(plan, cohort, ckpt, work / "pred", max(30.0, left()), run)
            pr.update(process_img_s=p["images_per_s"], steady_img_s=p["steady_images_per_s"], seconds=p["seconds"])
            if p["steady_images_per_s"]:
                pr["host_share"] = max(0.0, 1 - p["steady_images_per_s"] / pr["device_img_s"])
            print(f"predict: device {pr['device_img_s']:.0f}, host {pr['host_img_s']:.0f}, process "
                  f"{pr['process_img_s']:.0f} (steady {pr['steady_img_s']}) img/s", flush=True)
            if pr["process_img_s"] < GOALS["predict_img_s"] and left() > 30:
                print(predict_profile(plan, cohort, ckpt, work / "prof_out", out / "profile_predict.txt", profile_summary),
                      flush=True)
            res["compile"] = {}
            for mode in ("default", "reduce-overhead") if plan.device == "cuda" else ():
                if left() < 100:  # compiling takes about a minute
                    res["skipped"].append(f"torch.compile {mode}")
                    continue
                res["compile"][mode] = device_rate(plan, ckpt, compile_mode=mode)
                print(f"predict, device alone, compile {mode}: {res['compile'][mode]:.0f} img/s", flush=True)
        except Exception as exc:
            pr["error"] = str(exc)[-2000:]
            print(f"prediction part FAILED: {exc}", flush=True)

    table = render_table(res)
    print("\n" + table)
    (out / "gpu_table.md").write_text(table + "\n")
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
