"""The prediction parts of gpu_bench.py: the device half alone, the host half alone, the whole process.

``plan`` is gpu_bench's ``Plan`` (device, model width, sizes, batch, workers); every function
works on CUDA and, with tiny sizes, on the CPU (the smoke run).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path


def make_cohort(folder: Path, n: int, side: int) -> Path:
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        rng = np.random.default_rng(i)
        img = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"img_{i:06d}.png"), img)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(n)))
    return folder


def save_checkpoint(path: Path, plan) -> Path:
    from seg.checkpoint import model_checkpoint, save_checkpoint as save
    from seg.model import UNet

    pre = {"image_size": plan.predict_side, "in_channels": 3, "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "sampling": "resize"}
    save(model_checkpoint(UNet(3, plan.base), pre), path)
    return path


def device_rate(plan, ckpt: Path, compile_mode: str = "off", batches: int = 20) -> float:
    """Images/s of the device half alone (BatchForward.launch + result on a device-resident batch)."""
    import numpy as np
    import torch

    from seg.inference.device import BatchForward
    from seg.inference.engine import Predictor

    p = Predictor(ckpt, device=plan.device, precision="bf16", batch_size=plan.predict_batch)
    forward = BatchForward(p, compile=compile_mode, device_post=True)
    s = plan.predict_side
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (plan.predict_batch, s, s, 3), dtype=np.uint8))
    raw = raw.to(p.device)  # device-resident: no host work at all
    sizes = [(s, s)] * plan.predict_batch
    for _ in range(3):
        forward.launch(raw, sizes).result()
    t0 = time.perf_counter()
    for _ in range(batches):
        forward.launch(raw, sizes).result()
    return plan.predict_batch * batches / (time.perf_counter() - t0)


def host_rate(plan, cohort: Path, ckpt: Path, out: Path) -> float:
    """Images/s of `seg predict`'s host pipeline with the device half replaced (host_bench.HostOnly)."""
    from host_bench import HostOnly

    from seg.inference.engine import Predictor
    from seg.inference.inputs import build_units
    from seg.config.inference import PredictConfig
    from seg.inference.runner import CohortRun

    p = Predictor(ckpt, device="cpu", precision="fp32", batch_size=plan.predict_batch)
    units = build_units(str(cohort), None, None, 256)
    run_ = CohortRun(p, units, 0, 1, PredictConfig(output_dir=str(out), num_workers=plan.workers,
                                                   writer_threads=plan.workers, progress=False, qc=False))
    run_.batches = HostOnly(123)
    t0 = time.perf_counter()
    s = run_.run()
    return s["images"] / (time.perf_counter() - t0)


def predict_process(plan, cohort: Path, ckpt: Path, out: Path, timeout: float, run) -> dict:
    """`seg predict` as a whole process (``run`` is gpu_bench's subprocess helper): images/s, steady rate."""
    cmd = [sys.executable, "-m", "seg.predict", "--model_path", str(ckpt), "--image_dir", str(cohort),
           "--output_dir", str(out), "--batch_size", str(plan.predict_batch), "--num_workers", str(plan.workers),
           "--writer_threads", str(plan.workers), "--device", plan.device, "--no_progress"]
    seconds, log = run(cmd, timeout)
    steady = re.search(r"then ([\d.]+) images/s", log)
    return {"seconds": seconds, "images_per_s": plan.predict_images / seconds,
            "steady_images_per_s": float(steady.group(1)) if steady else None}


def predict_profile(plan, cohort: Path, ckpt: Path, out: Path, path: Path, profile_summary) -> str:
    """Profiler summary of the in-process cohort pipeline (host operators by self CPU time)."""
    from seg.inference.engine import Predictor
    from seg.inference.inputs import build_units
    from seg.config.inference import PredictConfig
    from seg.inference.runner import CohortRun

    p = Predictor(ckpt, device=plan.device, precision="bf16", batch_size=plan.predict_batch)
    units = build_units(str(cohort), None, None, 256)[:4]

    def once():
        shutil.rmtree(out, ignore_errors=True)
        CohortRun(p, units, 0, 1, PredictConfig(output_dir=str(out), num_workers=plan.workers,
                                                writer_threads=plan.workers, progress=False, qc=False)).run()

    return profile_summary(once, plan, path, steps=1, sort="self_cpu_time_total")
