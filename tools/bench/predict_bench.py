"""Benchmarks of `seg predict` (CPU figures for docs/BENCHMARKS.md). Run when the machine is quiet.

    python tools/bench/predict_bench.py --work /tmp/predict_bench            # everything
    python tools/bench/predict_bench.py --only reference|compute|tiny|tile|qc  # one part
    python tools/bench/predict_bench.py --only qc --qc_case tiny|big            # one QC cohort

Parts:
  reference  the same cohort (100 images 256x256 JPEG) and the same 31M U-Net (random weights:
             speed does not depend on them): (a) tools/bench/reference_predict.py (Pytorch-UNet's
             method) and (b) `seg predict`, each as a whole process (start-up included).
  compute    the bf16 compute limit: a bare bf16 channels_last forward of the 31M model at 256px
             (BatchNorm folded, as seg predict runs it), batch 8, 15 s after warm-up (no decode,
             no writing), images/s and GFLOP/s (96.3
             GFLOP/img, counted by tools/bench/flops.py).
  tiny       a tiny U-Net (base 4, trained size 32) on 20,000 small (32x32) PNGs: `seg predict` vs a bare single-
             process cv2 read+write loop (rate ratio); peak RSS of `seg predict` at 1,000 and
             20,000 images (process tree sampled every 50 ms).
  tile       sliding-window prediction of one 8192x8192 RGB image (tiny model, 256px tiles),
             peak RSS.
  qc         the cost of per-image quality control (seg.inference.qc) without --tta: `seg predict`
             with QC (the default) and with --no_qc on the same cohorts, side by side, rounds
             interleaved (on/off/on/off/...), best round of each: 5,000 tiny 32 px PNGs (tiny
             model, batch 64) and 100 256 px JPEGs (31M model, batch 8). Images/s whole process
             and steady state, the throughput ratio QC on / QC off, and the CPU seconds of the
             whole process tree (getrusage of reaped children: steadier than wall time on a
             shared machine) with the share QC adds.
Prints one line per figure and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools" / "bench")]


def checkpoint(path: Path, base: int, size: int, sampling: str = "resize") -> Path:
    import torch

    from seg.checkpoint import model_checkpoint, save_checkpoint
    from seg.model import UNet

    if not path.exists():
        torch.manual_seed(0)
        pre = {"image_size": size, "in_channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "sampling": sampling}
        save_checkpoint(model_checkpoint(UNet(3, base), pre), path)
    return path


def make_images(folder: Path, n: int, side: int, ext: str = ".jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.iterdir())) >= n:
        return folder
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8), (side, side))
    for i in range(n):
        img = np.roll(base, i, axis=1) // 2 + rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i:06d}{ext}"), img)
    return folder


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (main process, and whole process tree) of a command."""
    import psutil
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU of reaped descendants, recursively
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            rss = [p.memory_info().rss for p in procs]
            peak_main, peak_tree = max(peak_main, rss[0]), max(peak_tree, sum(rss))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_main_mb": round(peak_main / 2**20),
            "peak_rss_tree_mb": round(peak_tree / 2**20), "stdout": out.strip().splitlines()[-3:]}


def fresh(folder: Path) -> Path:
    """An empty output folder (a rerun into a finished one would skip every unit)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def seg_predict(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "seg.predict", "--no_progress", *map(str, args)]


def parse_summary(lines: list[str]) -> dict:
    import re

    text = " ".join(lines)
    start = re.search(r"first batch in the model ([\d.]+) s after start", text)
    first = re.search(r"done at ([\d.]+) s", text)
    steady = re.search(r"then ([\d.]+) images/s", text)
    return {"first_batch_start_s": float(start.group(1)) if start else None,
            "first_batch_s": float(first.group(1)) if first else None,
            "steady_images_per_s": float(steady.group(1)) if steady else None}


def part_reference(work: Path, n: int = 100) -> dict:
    images = make_images(work / "cohort256", n, 256)
    ckpt = checkpoint(work / "unet31m_256.pth", 64, 256)
    ref = measure([sys.executable, str(REPO / "tools/bench/reference_predict.py"), "--model", str(ckpt),
                   "--input", str(images), "--output", str(fresh(work / "ref_out"))])
    ref["images_per_s"] = round(n / ref["seconds"], 3)
    print(f"(a) reference method: {n} images in {ref['seconds']} s = {ref['images_per_s']} images/s (whole process)",
          flush=True)
    seg = measure(seg_predict(["--model_path", ckpt, "--image_dir", images, "--output_dir", fresh(work / "seg_out"),
                               "--batch_size", 8, "--num_workers", 1, "--writer_threads", 2]))
    seg.update(parse_summary(seg["stdout"]))
    seg["images_per_s"] = round(n / seg["seconds"], 3)
    print(f"(b) seg predict: {n} images in {seg['seconds']} s = {seg['images_per_s']} images/s (whole process); "
          f"first batch enters the model {seg['first_batch_start_s']} s after start, done at "
          f"{seg['first_batch_s']} s; steady {seg['steady_images_per_s']} images/s; "
          f"speed-up {seg['images_per_s'] / ref['images_per_s']:.2f}x", flush=True)
    return {"reference": ref, "seg_predict": seg, "speedup": round(seg["images_per_s"] / ref["images_per_s"], 2)}


def part_compute(work: Path, batch: int = 8, seconds: float = 15.0) -> dict:
    import torch

    from flops import forward_flops_per_image  # tools/bench/flops.py, beside this file

    from seg.model import UNet

    from seg.inference.engine import fold_batchnorm

    model = fold_batchnorm(UNet(3, 64).eval()).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # warm-up (oneDNN primitive creation)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
        elapsed = time.perf_counter() - start
    rate = done / elapsed
    gflop = forward_flops_per_image(256) / 1e9
    print(f"bf16 compute limit: {rate:.2f} images/s at batch {batch} = {rate * gflop:.0f} GFLOP/s "
          f"({gflop:.1f} GFLOP/img), torch threads {torch.get_num_threads()}", flush=True)
    return {"images_per_s": round(rate, 3), "gflop_per_s": round(rate * gflop, 1), "gflop_per_image": round(gflop, 1)}


def cv2_loop(folder: Path, out: Path, limit: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.iterdir())[:limit]
    start = time.perf_counter()
    for path in files:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(out / f"{path.stem}_mask.png"), (img[..., 0] > 127).astype(np.uint8) * 255)
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": round(seconds, 2), "images_per_s": round(len(files) / seconds, 1)}


def part_tiny(work: Path, n: int = 20000, small: int = 1000, side: int = 32, base: int = 4) -> dict:
    images = make_images(work / f"tiny{n}_{side}px", n, side, ext=".png")
    subset = work / "tiny1k.txt"
    subset.write_text("\n".join(str(p) for p in sorted(images.iterdir())[:small]) + "\n")
    ckpt = checkpoint(work / f"unet_base{base}_{side}.pth", base, side)
    loop = cv2_loop(images, fresh(work / "cv2_out"), n)
    print(f"bare cv2 read+write loop: {loop['images']} images in {loop['seconds']} s = {loop['images_per_s']} images/s",
          flush=True)
    common = ["--model_path", ckpt, "--batch_size", 64, "--num_workers", 1, "--writer_threads", 2]
    one_k = measure(seg_predict(["--list", subset, "--output_dir", fresh(work / "seg_tiny1k"), *common]))
    full = measure(seg_predict(["--image_dir", images, "--output_dir", fresh(work / "seg_tiny20k"), *common]))
    full.update(parse_summary(full["stdout"]))
    full["images_per_s"] = round(n / full["seconds"], 1)
    print(f"seg predict tiny: {n} images in {full['seconds']} s = {full['images_per_s']} images/s whole process "
          f"(steady {full['steady_images_per_s']}); ratio to cv2 loop {full['images_per_s'] / loop['images_per_s']:.2f} "
          f"(steady {(full['steady_images_per_s'] or 0) / loop['images_per_s']:.2f})", flush=True)
    print(f"peak RSS main/tree: {small} images {one_k['peak_rss_main_mb']}/{one_k['peak_rss_tree_mb']} MB, "
          f"{n} images {full['peak_rss_main_mb']}/{full['peak_rss_tree_mb']} MB", flush=True)
    return {"cv2_loop": loop, "seg_1k": one_k, "seg_20k": full,
            "rate_ratio": round(full["images_per_s"] / loop["images_per_s"], 3),
            "rss_growth_main": round(full["peak_rss_main_mb"] / max(one_k["peak_rss_main_mb"], 1) - 1, 3),
            "rss_growth_tree": round(full["peak_rss_tree_mb"] / max(one_k["peak_rss_tree_mb"], 1) - 1, 3)}


def part_tile(work: Path, side: int = 8192) -> dict:
    path = work / f"big{side}.png"
    if not path.exists():
        rng = np.random.default_rng(0)
        img = cv2.resize(rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8), (side, side))
        cv2.imwrite(str(path), img)
        del img
    ckpt = checkpoint(work / "unet_tiny_patch256.pth", 4, 256, sampling="patch")
    res = measure(seg_predict(["--model_path", ckpt, "--image_path", path, "--output_dir", fresh(work / "tile_out"),
                               "--batch_size", 8]))
    mask = cv2.imread(str(work / "tile_out" / f"big{side}_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.shape == (side, side), "the tiled mask has the wrong size"
    print(f"tiled {side}x{side}: {res['seconds']} s, peak RSS {res['peak_rss_main_mb']} MB", flush=True)
    return res


def part_qc(work: Path, rounds: int = 3, only: str | None = None) -> dict:
    cases = {}
    if only in (None, "tiny"):
        cases["tiny 32px x5000"] = (make_images(work / "qc_tiny5000_32px", 5000, 32, ext=".png"),
                                    checkpoint(work / "unet_base4_32.pth", 4, 32), 64)
    if only in (None, "big"):
        cases["31M 256px x100"] = (make_images(work / "qc_cohort256", 100, 256),
                                   checkpoint(work / "unet31m_256.pth", 64, 256), 8)
    out = {}
    for name, (images, ckpt, batch) in cases.items():
        n = len(list(images.iterdir()))
        runs: dict[str, list] = {"on": [], "off": []}
        for _ in range(rounds):
            for mode in ("on", "off"):
                extra = [] if mode == "on" else ["--no_qc"]
                res = measure(seg_predict(["--model_path", ckpt, "--image_dir", images, "--batch_size", batch,
                                           "--num_workers", 1, "--writer_threads", 2,
                                           "--output_dir", fresh(work / f"qc_{mode}"), *extra]))
                res.update(parse_summary(res["stdout"]))
                res["images_per_s"] = round(n / res["seconds"], 2)
                runs[mode].append(res)
        best = {m: max(r, key=lambda x: x["images_per_s"]) for m, r in runs.items()}
        cpu = {m: min(x["cpu_seconds"] for x in r) for m, r in runs.items()}  # CPU of the whole process tree
        steady = {m: max((x["steady_images_per_s"] or 0) for x in r) for m, r in runs.items()}
        ratio = best["on"]["images_per_s"] / best["off"]["images_per_s"]
        steady_ratio = steady["on"] / steady["off"] if steady["off"] else None
        print(f"QC cost, {name}: with QC {best['on']['images_per_s']} img/s (steady {steady['on']}), "
              f"--no_qc {best['off']['images_per_s']} img/s (steady {steady['off']}): ratio {ratio:.3f} "
              f"(steady {steady_ratio:.3f}); all rounds on {[r['images_per_s'] for r in runs['on']]}, "
              f"off {[r['images_per_s'] for r in runs['off']]}; CPU seconds (process tree, least of the rounds) "
              f"with QC {cpu['on']}, --no_qc {cpu['off']}: QC adds {100 * (cpu['on'] / cpu['off'] - 1):.1f} %", flush=True)
        out[name] = {"on": [r["images_per_s"] for r in runs["on"]], "off": [r["images_per_s"] for r in runs["off"]],
                     "steady_on": steady["on"], "steady_off": steady["off"], "ratio": round(ratio, 3),
                     "cpu_on": [r["cpu_seconds"] for r in runs["on"]], "cpu_off": [r["cpu_seconds"] for r in runs["off"]],
                     "cpu_added": round(cpu["on"] / cpu["off"] - 1, 4),
                     "steady_ratio": None if steady_ratio is None else round(steady_ratio, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/predict_bench")
    parser.add_argument("--only", choices=("reference", "compute", "tiny", "tile", "qc"), action="append")
    parser.add_argument("--qc_case", choices=("tiny", "big"), default=None, help="qc part: one of its two cohorts")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = {"reference": part_reference, "compute": part_compute, "tiny": part_tiny, "tile": part_tile,
             "qc": lambda w: part_qc(w, only=args.qc_case)}
    results = {name: fn(work) for name, fn in parts.items() if not args.only or name in args.only}
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
