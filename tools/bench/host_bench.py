"""Host pipelines against their own limits, on CPU: what a fast GPU would leave exposed.

Prediction (``--only predict``): `seg predict`'s whole cohort pipeline (``CohortRun``: listing,
units, DataLoader decoding processes, batching, the forward call, writer threads, manifest) with
the model replaced by a trivial op (the first input channel as the logit: the mask is
``R > 0.485 * 255``), against a bare loop doing the same work over the same files: PNG decode
(``cv2.imread``), the same threshold, PNG encode (``cv2.imencode``) and one write per file,
parallelised over the same cores (a ``multiprocessing`` pool, one process per core). Both run
pinned to the same cores (``taskset``), rounds interleaved (loop, pipeline, loop, ...); the best
of each is reported with their ratio. The masks of both are compared (identical by
construction). ``--sweep`` adds pipeline runs on 2 cores over ``--num_workers`` x
``--writer_threads`` to show where throughput comes from.

Training (``--only train``): images/s that the training loader (``seg.training.loaders.train_loader``,
default augmentation, 512 px, batch 8) sustains with 1 and 2 worker processes, each pinned run
on as many cores, after its first batch; per worker core = the 1-worker rate.

    python tools/bench/host_bench.py --work /tmp/host_bench [--only predict|train] [--rounds 3]
        [--sizes 32 256] [--cores 1 2] [--sweep] [--trivial model|device] [--json OUT.json]

One pipeline run of another checkout (before/after a change), pinned to one core:
    git archive COMMIT seg | tar -x -C /tmp/seg_before
    taskset -c 0 python tools/bench/host_bench.py --child pipeline --seg_root /tmp/seg_before --cores 1 \
        --trivial model --images WORK/cohort256 --out WORK/out --checkpoint WORK/model256.pth \
        --batch_size 16 --num_workers 1 --writer_threads 1
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

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

COHORT = {32: 20000, 256: 1500}  # images per cohort: a few seconds per run on one core
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---- data ------------------------------------------------------------------------------------
def make_cohort(folder: Path, n: int, side: int) -> Path:
    """``n`` RGB PNGs of ``side`` px with smooth structure (compressible like real images)."""
    import cv2
    import numpy as np

    if folder.is_dir() and len(os.listdir(folder)) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (max(4, side // 8),) * 2 + (3,), dtype=np.uint8), (side, side))
    for i in range(n):
        img = np.roll(base, i, axis=1) // 2 + rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i:06d}.png"), img)
    return folder


def make_checkpoint(path: Path, side: int) -> Path:
    """A tiny model's checkpoint trained at ``side`` (prediction resizes nothing): its
    preprocessing is what the pipeline runs; the model itself is replaced by the trivial op."""
    import torch

    from seg.checkpoint import model_checkpoint, save_checkpoint
    from seg.model import UNet

    if not path.exists():
        torch.manual_seed(0)
        pre = {"image_size": side, "in_channels": 3, "mean": MEAN, "std": STD, "sampling": "resize"}
        save_checkpoint(model_checkpoint(UNet(3, 4), pre), path)
    return path


# ---- children (run pinned with taskset) --------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its waited-for children
    (the loop's pool and the pipeline's DataLoader workers are joined before the timer stops)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _loop_chunk(job: tuple[list[str], str, int]) -> int:
    import cv2
    import numpy as np

    files, out, cut = job
    for path in files:
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        mask = (img[:, :, 2] > cut).astype(np.uint8) * 255  # BGR: channel 2 is R
        ok, buf = cv2.imencode(".png", mask)
        name = os.path.basename(path)[:-4] + "_mask.png"
        fd = os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, buf)
        os.close(fd)
    return len(files)


def child_loop(a) -> dict:
    """The bare loop: list, then decode + threshold + encode + write in ``cores`` processes."""
    import multiprocessing as mp

    import cv2

    cv2.setNumThreads(1)
    cut = int(MEAN[0] * 255)  # R > 123 <=> (R / 255 - 0.485) / 0.229 > 0 <=> sigmoid > 0.5
    t0, c0 = time.perf_counter(), cpu_seconds()
    files = sorted(os.path.join(a.images, f) for f in os.listdir(a.images) if f.endswith(".png"))
    os.makedirs(a.out, exist_ok=True)
    jobs = [(files[i:i + 128], a.out, cut) for i in range(0, len(files), 128)]
    with mp.get_context("fork").Pool(a.cores[0]) as pool:
        n = sum(pool.imap_unordered(_loop_chunk, jobs))
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_us_per_image": (cpu_seconds() - c0) / n * 1e6}


class FirstChannel:
    """``--trivial model``: the network is the first normalised input channel as the logit
    (``(N,C,H,W) -> (N,1,H,W)``); scaling, mean/std and the sigmoid still run, on the CPU."""

    def __call__(self, x):
        return x[:, :1]


class HostOnly:
    """``--trivial device``: the whole device half of a batch (copy, scaling, model, sigmoid,
    resize back, threshold, counts: ``seg.inference.device.BatchForward`` on CUDA) replaced by
    the same threshold on the raw pixels; the host gets what the CUDA path hands it (uint8 0/255
    masks at the original size and foreground counts), so what is measured is the host's share."""

    device_post = True

    def __init__(self, cut: int):
        self.cut = cut

    def launch(self, raw, sizes):
        from seg.inference.device import BatchOutput, Ready

        import numpy as np

        above = raw.numpy()[..., 0] > self.cut  # RGB: channel 0 is R; numpy, as the loop does it
        return Ready(BatchOutput(masks=np.multiply(above, np.uint8(255), dtype=np.uint8),
                                 counts=np.count_nonzero(above.reshape(len(above), -1), axis=1).tolist()))


def child_pipeline(a) -> dict:
    """`seg predict`'s cohort pipeline (listing, units, CohortRun) with the trivial model."""
    from seg.inference.engine import Predictor
    from seg.inference.inputs import build_units
    from seg.config.inference import PredictConfig
    from seg.inference.runner import CohortRun

    p = Predictor(a.checkpoint, device="cpu", precision="fp32", batch_size=a.batch_size)
    p.model = FirstChannel()
    t0, c0 = time.perf_counter(), cpu_seconds()
    units = build_units(a.images, None, None, 256, exclude=a.out)
    opts = PredictConfig(output_dir=a.out, num_workers=a.num_workers, writer_threads=a.writer_threads,
                         progress=False, qc=False)  # the pipeline of --no_qc: QC's cost is predict_bench's
    run = CohortRun(p, units, 0, 1, opts)
    if a.trivial[0] == "device":
        run.batches = HostOnly(int(MEAN[0] * 255))
    s = run.run()
    seconds = time.perf_counter() - t0
    return {"images": s["images"], "seconds": seconds, "images_per_s": s["images"] / seconds,
            "cpu_us_per_image": (cpu_seconds() - c0) / s["images"] * 1e6, "steady_images_per_s": s["steady_images_per_s"]}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_train(a) -> dict:
    """Images/s of the training loader after its first batch (worker start and import excluded),
    and the CPU its worker processes and this process spent per image in that window."""
    import torch

    from seg.config import build_config
    from seg.training.loaders import DataSpec, train_loader

    torch.set_num_threads(1)
    cfg = build_config(flags={"data.data_dir": a.shards, "data.image_size": 512, "train.batch_size": 8,
                              "data.num_workers": a.num_workers})
    spec = DataSpec(cfg)
    it = iter(train_loader(cfg, spec, epoch=0, rank=0, world_size=1))
    next(it)
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    c0 = sum(_proc_cpu(p) for p in pids)
    t0 = time.perf_counter()
    images = 0
    while time.perf_counter() - t0 < a.seconds:
        images += len(next(it)[0])
    seconds = time.perf_counter() - t0
    cpu = sum(_proc_cpu(p) for p in pids) - c0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "cpu_us_per_image": cpu / images * 1e6}


CHILDREN = {"loop": child_loop, "pipeline": child_pipeline, "train": child_train}


def run_child(kind: str, cores: int, **kw) -> dict:
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--child", kind, "--cores", str(cores)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- parts -------------------------------------------------------------------------------------
def same_masks(a: Path, b: Path, sample: int = 50) -> bool:
    import cv2
    import numpy as np

    names = sorted(os.listdir(a))[:: max(1, len(os.listdir(a)) // sample)]
    return all(np.array_equal(cv2.imread(str(a / n), cv2.IMREAD_UNCHANGED), cv2.imread(str(b / n), cv2.IMREAD_UNCHANGED))
               for n in names)


def pipeline_settings(cores: int) -> tuple[int, int]:
    """(num_workers, writer_threads) used for a core count: one decoding process and one writer
    thread per core (the main thread only batches: its trivial forward is cheap)."""
    return cores, cores


def _best(runs: list[dict]) -> dict:
    """The fastest run (least disturbed by the machine's other load) and the least CPU per image."""
    return {"img_s": max(r["images_per_s"] for r in runs), "cpu_us": min(r["cpu_us_per_image"] for r in runs),
            "rounds_img_s": [round(r["images_per_s"]) for r in runs]}


def part_predict(work: Path, sizes: list[int], cores_list: list[int], rounds: int, sweep: bool,
                 trivials: list[str]) -> dict:
    results: dict = {}
    for side in sizes:
        images = make_cohort(work / f"cohort{side}", COHORT[side], side)
        ckpt = make_checkpoint(work / f"model{side}.pth", side)
        batch = 64 if side <= 64 else 16
        for cores in cores_list:
            nw, wt = pipeline_settings(cores)
            runs: dict[str, list[dict]] = {"loop": [], **{t: [] for t in trivials}}
            for r in range(rounds):  # interleaved: the machine's other load hits every variant alike
                shutil.rmtree(work / "out_loop", ignore_errors=True)
                runs["loop"].append(run_child("loop", cores, images=images, out=work / "out_loop"))
                for t in trivials:
                    shutil.rmtree(work / f"out_{t}", ignore_errors=True)
                    runs[t].append(run_child("pipeline", cores, images=images, out=work / f"out_{t}", checkpoint=ckpt,
                                             batch_size=batch, num_workers=nw, writer_threads=wt, trivial=t))
                print(f"{side}px {cores} core(s) round {r + 1}: " + ", ".join(
                    f"{k} {v[-1]['images_per_s']:.0f} img/s ({v[-1]['cpu_us_per_image']:.0f} us CPU/img)"
                    for k, v in runs.items()), flush=True)
            key = f"{side}px_{cores}core"
            loop = _best(runs["loop"])
            res = {"images": COHORT[side], "cores": cores, "num_workers": nw, "writer_threads": wt,
                   "batch_size": batch, "loop": loop}
            for t in trivials:
                best = _best(runs[t])
                best["ratio"] = best["img_s"] / loop["img_s"]
                best["cpu_ratio"] = loop["cpu_us"] / best["cpu_us"]
                best["masks_identical"] = same_masks(work / "out_loop", work / f"out_{t}")
                res[t] = best
                print(f"== {key}, trivial {t}: loop {loop['img_s']:.0f} img/s, pipeline {best['img_s']:.0f} img/s "
                      f"(num_workers {nw}, writer_threads {wt}) -> {best['ratio']:.2f} of the loop (target >= 0.80); "
                      f"CPU per image {loop['cpu_us']:.0f} vs {best['cpu_us']:.0f} us -> {best['cpu_ratio']:.2f}; "
                      f"masks identical: {best['masks_identical']}", flush=True)
            results[key] = res
        if sweep:
            rates = {}
            for nw, wt in ((0, 1), (1, 1), (1, 2), (2, 1), (2, 2), (2, 4)):
                shutil.rmtree(work / "out_sweep", ignore_errors=True)
                rates[f"nw{nw}_wt{wt}"] = run_child("pipeline", 2, images=images, out=work / "out_sweep",
                                                    checkpoint=ckpt, batch_size=batch, num_workers=nw,
                                                    writer_threads=wt, trivial=trivials[-1])["images_per_s"]
                print(f"sweep {side}px 2 cores, trivial {trivials[-1]}: num_workers {nw} writer_threads {wt}: "
                      f"{rates[f'nw{nw}_wt{wt}']:.0f} img/s", flush=True)
            results[f"{side}px_sweep_2core"] = rates
    return results


def part_train(work: Path, rounds: int, seconds: float = 12.0) -> dict:
    from seg.data.synthetic import make_demo_dataset
    from seg.data.sharding import prepare_dataset

    shards = work / "shards512"
    if not (shards / "dataset.json").is_file():
        raw = make_demo_dataset(work / "raw512", n=96, size=512, seed=0)
        prepare_dataset(raw / "images", raw / "masks", out=shards, val_split=0.1, shard_size=8, workers=0,
                        progress=False)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(rounds):
        for workers in (1, 2):
            runs[workers].append(run_child("train", workers, shards=shards, num_workers=workers, seconds=seconds))
            x = runs[workers][-1]
            print(f"train loader 512px round {r + 1}: {workers} worker(s) on {workers} core(s): "
                  f"{x['images_per_s']:.1f} img/s, {x['cpu_us_per_image'] / 1e3:.1f} ms CPU/img", flush=True)
    best = {w: max(x["images_per_s"] for x in v) for w, v in runs.items()}
    cpu_ms = min(x["cpu_us_per_image"] for v in runs.values() for x in v) / 1e3
    print(f"== train loader 512px, batch 8, default augmentation: {best[1]:.1f} img/s with 1 worker on 1 core, "
          f"{best[2]:.1f} img/s with 2 on 2 ({best[2] / best[1]:.2f}x); {cpu_ms:.1f} ms of CPU per image "
          f"= {1e3 / cpu_ms:.0f} img/s per fully used core", flush=True)
    return {"one_worker_img_s": best[1], "two_workers_img_s": best[2], "cpu_ms_per_image": cpu_ms,
            "img_s_per_core": 1e3 / cpu_ms, "rounds": {w: [round(x["images_per_s"], 1) for x in v]
                                                       for w, v in runs.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/host_bench")
    ap.add_argument("--only", choices=("predict", "train"), action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 256], choices=sorted(COHORT))
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sweep", action="store_true", help="also pipeline runs over num_workers x writer_threads")
    ap.add_argument("--json", type=Path)
    # child mode
    ap.add_argument("--child", choices=sorted(CHILDREN))
    for name in ("images", "out", "checkpoint", "shards", "seg_root"):
        ap.add_argument(f"--{name}")
    for name in ("batch_size", "num_workers", "writer_threads"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--trivial", choices=("model", "device"), action="append",
                    help="what the trivial op replaces: the network only (scaling and sigmoid on the CPU), or the "
                         "whole device half as a GPU would run it (default: both)")
    a = ap.parse_args()
    if a.child:
        if a.seg_root:  # another checkout's seg (e.g. `git archive COMMIT seg | tar -x -C DIR`), for before/after
            sys.path.insert(0, a.seg_root)
            import seg

            assert Path(seg.__file__).is_relative_to(Path(a.seg_root).resolve()), seg.__file__
        print(json.dumps(CHILDREN[a.child](a)))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    if not a.only or "predict" in a.only:
        res["predict"] = part_predict(work, a.sizes, a.cores, a.rounds, a.sweep, a.trivial or ["model", "device"])
    if not a.only or "train" in a.only:
        res["train"] = part_train(work, a.rounds)
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
