"""Accuracy on real images: training recipes side by side at the same compute budget.

    nice -n 5 python tools/bench/accuracy_bench.py --work runs/accuracy --budget_s 240 \\
        --json runs/accuracy/result.json --markdown runs/accuracy/table.md

Tasks (``accuracy_data.py``): grey / white matter on axial slices of the MNI ICBM152 T1
template (train the lower slices, validate the middle, test the upper ones, where the
structures shrink) and fluorescence nuclei (tiles split by region). Recipes:

- ``reference``: ``reference_train.py`` (Pytorch-UNet's recipe: RMSprop 1e-5, no augmentation,
  fp32, batch 4; the epoch with the best validation Dice is kept, as for ``seg train``).
- ``seg_before``: ``seg train`` with the defaults it had before the recipe work (Adam 1e-3,
  plateau schedule, BatchNorm, standard augmentation, no EMA), given as dotted overrides
  (``BEFORE``): the old behaviour stays reachable by config.
- ``seg_new``: ``seg train`` with the code defaults.
- ``--variant NAME='train.x=1 model.y=2'``: more ``seg train`` recipes (dotted overrides on
  the code defaults), for screening.

Every run gets the same network (U-Net width ``--width``, ``--size`` px input) and the same
compute budget, counted in CPU seconds of the whole process tree (user + system, DataLoader
workers included): ``2 x --budget_s``, i.e. ``--budget_s`` of wall-clock on an idle 2-core
machine kept busy. Not wall-clock: these machines are shared, and under other jobs' load (load
average 7-10 on 2 cores) a 5 s ``seg train`` epoch took 100-110 s and a 10 s reference epoch
31-39 s, so a wall-clock budget measured the neighbours rather than the recipes. Every process
runs with ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads burn CPU time while they wait for
a core (10 reference steps: 85-159 s wall-clock with the default, 17-26 s passive, under the
same load), so CPU time is the work done. Calibration: each recipe runs 1 and 3 epochs on each
task; the difference gives CPU seconds per epoch, the rest is start-up; each recipe then gets
the number of epochs that fits the budget (so schedules know their length). The CPU seconds
and wall-clock each run took are reported with the load average.

Run one benchmark at a time, on a machine without other heavy jobs. ``seg train`` computes in
bf16 on a CPU with AMX (the ``auto`` precision), and the AMX unit is shared: two benchmark
streams side by side took ``seg train``'s nuclei epoch from 6.2 to 22 CPU s while the fp32
reference went from about 10 to 10.8, so concurrent runs measure the contention, not the
recipes (CPU time under contention is not work done).

The kept model predicts the test images with ``seg predict --precision fp32`` (the recipes'
weights are compared, not inference precision), with the threshold and post-processing its
checkpoint carries (``seg train`` chooses them on the validation images at the end of
training, ``train.tune_postprocessing``; the reference keeps 0.5), and
``seg evaluate --pred_dir --gt_dir`` scores them. ``--retune`` gives runs that finished before
``seg train`` made that choice their choice, by rerunning their command (which, on a finished
run, makes only the choice), and scores them again. The last column is what choosing on
``seg evaluate --tune_postprocessing``'s grid at the images' own resolution would give any
recipe, the reference included. Per run: per-image mean Dice, pooled Dice, the worst image's
Dice, test images whose truth has foreground but whose prediction is empty, and the largest drop of validation
Dice below its running best after the first 20 % of epochs (on the curve that selects the
model; for a weight-averaged run the raw weights' curve is in the JSON too). Finished runs
are kept (``result.json`` in the run folder) and not redone: rerun the same command after an
interruption.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy_data import TASKS, write_task  # noqa: E402

sys.path.insert(0, str(HERE.parents[1]))
from seg.training.history import largest_drop  # noqa: E402

# seg train's defaults before the recipe work, as overrides (reachable by config ever since)
BEFORE = ["train.lr=1e-3", "train.optimizer=adam", "train.weight_decay=1e-5", "train.scheduler=plateau",
          "train.warmup_epochs=0", "train.ema_decay=0", "model.norm=batch", "data.augmentation=standard",
          "train.dice_reduction=batch", "train.early_stopping=15", "train.tune_postprocessing=false",
          "train.select_on=dice"]
SEG_BIN = [sys.executable, "-m", "seg"]


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], log: Path, timeout: float | None = None) -> tuple[float, float]:
    """Run a command with its output in ``log``; returns (wall-clock s, CPU s of its process tree)."""
    start, cpu = time.perf_counter(), _cpu_children()
    with log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return time.perf_counter() - start, _cpu_children() - cpu


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


class Recipe:
    """How to train one recipe: ``train(task_dir, run_dir, epochs, seed, log)`` -> (wall s, CPU s)."""

    def __init__(self, name: str, overrides: list[str] | None, args):
        self.name, self.overrides, self.args = name, overrides, args  # overrides None: the reference

    def train(self, task_dir: Path, run_dir: Path, epochs: int, seed: int, log: Path,
              resume: bool = False) -> tuple[float, float]:
        a = self.args
        if self.overrides is None:
            cmd = [sys.executable, str(HERE / "reference_train.py"), "--images", str(task_dir / "trainval/images"),
                   "--masks", str(task_dir / "trainval/masks"), "--val_list", str(task_dir / "val_list.txt"),
                   "--out", str(run_dir), "--epochs", str(epochs), "--batch_size", "4", "--size", str(a.size),
                   "--width", str(a.width), "--seed", str(seed), "--interpolation", "linear", "--no-epoch_checkpoints"]
        else:
            cmd = [*SEG_BIN, "train", "--data_dir", str(task_dir / "shards"), "--checkpoint_dir", str(run_dir),
                   "--epochs", str(epochs), "--image_size", str(a.size), f"model.base_channels={a.width}",
                   f"train.seed={seed}", f"train.resume={str(resume).lower()}", "train.save_every=0",
                   *self.overrides]
        return _run(cmd, log)


def _calibrate(recipe: Recipe, task_dir: Path, work: Path) -> dict:
    """CPU seconds per epoch and fixed (start-up, end) CPU seconds, from runs of 1 and 3 epochs."""
    path = work / "calibration" / f"{task_dir.name}-{recipe.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    measured = {}
    for epochs in (1, 3):
        run_dir = work / "calibration" / f"{task_dir.name}-{recipe.name}-{epochs}"
        run_dir.mkdir(parents=True, exist_ok=True)
        measured[epochs] = recipe.train(task_dir, run_dir, epochs, 0, run_dir / "log.txt")
    per_epoch = max(1e-3, (measured[3][1] - measured[1][1]) / 2)
    cal = {"per_epoch_cpu_s": per_epoch, "fixed_cpu_s": max(0.0, measured[1][1] - per_epoch),
           "wall_s": {e: w for e, (w, _) in measured.items()}, "cpu_s": {e: c for e, (_, c) in measured.items()},
           "load_avg": os.getloadavg()[0]}
    path.write_text(json.dumps(cal))
    return cal


def max_drop(dice: list[float], skip_fraction: float = 0.2) -> float:
    """Largest (running best - value) over the epochs after the first ``skip_fraction`` of them."""
    return largest_drop(dice, math.ceil(skip_fraction * len(dice)))[0]


def _score(run_dir: Path, task_dir: Path, log: Path) -> dict:
    pred, ev = run_dir / "test_pred", run_dir / "test_eval"
    _run([*SEG_BIN, "predict", "--model_path", str(run_dir / "best_model.pth"), "--image_dir",
          str(task_dir / "test/images"), "--output_dir", str(pred), "--precision", "fp32", "--no_progress",
          "--overwrite", "--save_probability"], log)
    _run([*SEG_BIN, "evaluate", "--pred_dir", str(pred), "--gt_dir", str(task_dir / "test/masks"),
          "--output_dir", str(ev), "--no_progress"], log)
    report = json.loads((ev / "evaluation_report.json").read_text())
    per = report["per_image"]
    empty = [p["id"] for p in per if p["tp"] + p["fn"] > 0 and p["tp"] + p["fp"] == 0]
    worst = min(per, key=lambda p: p["dice"])
    return {"mean_dice": report["mean"]["dice"], "pooled_dice": report["global"]["dice"],
            "worst_dice": worst["dice"], "worst_id": worst["id"], "empty_on_foreground": len(empty),
            "empty_ids": empty, "n_test": report["n_images"],
            "n_test_foreground": sum(1 for p in per if p["tp"] + p["fn"] > 0)}


def _read_prob(path: Path):
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype("float32") / 65535.0


def _read_truth(path: Path):
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0


def _postprocessed(run_dir: Path, task_dir: Path, log: Path) -> dict:
    """Post-processing and threshold chosen on the validation images (``seg.postprocess``),
    applied to the test probabilities: what ``seg evaluate --tune_postprocessing`` would buy."""
    import numpy as np

    from seg.postprocess import tune_postprocessing

    names = (task_dir / "val_list.txt").read_text().split()
    listing = run_dir / "val_paths.txt"
    listing.write_text("".join(f"{task_dir / 'trainval/images' / n}.png\n" for n in names))
    val_pred = run_dir / "val_pred"
    _run([*SEG_BIN, "predict", "--model_path", str(run_dir / "best_model.pth"), "--list", str(listing),
          "--output_dir", str(val_pred), "--precision", "fp32", "--no_progress", "--overwrite",
          "--save_probability"], log)
    tuned = tune_postprocessing([_read_prob(val_pred / f"{n}_prob.png") for n in names],
                                [_read_truth(task_dir / "trainval/masks" / f"{n}_mask.png") for n in names])
    dice, counts = [], []
    for truth_path in sorted((task_dir / "test/masks").glob("*_mask.png")):
        name = truth_path.name[: -len("_mask.png")]
        truth = _read_truth(truth_path)
        pred = tuned["postprocess"].apply(_read_prob(run_dir / "test_pred" / f"{name}_prob.png") > tuned["threshold"])
        tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
        counts.append((tp, fp, fn))
        dice.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    tp, fp, fn = np.sum(counts, axis=0)
    return {"pp": {"threshold": tuned["threshold"], **tuned["postprocess"].to_dict(), "val_dice": tuned["dice"],
                   "val_baseline": tuned["baseline_dice"]},
            "pp_mean_dice": float(np.mean(dice)), "pp_pooled_dice": float(2 * tp / (2 * tp + fp + fn)),
            "pp_worst_dice": float(min(dice)),
            "pp_empty_on_foreground": sum(1 for a, b, c in counts if a + c > 0 and a + b == 0)}


def _train_tuning(run_dir: Path) -> dict | None:
    """The threshold and post-processing ``seg train`` stored in ``best_model.pth`` (None: none),
    with its epoch and, where two epochs were candidates (``train.select_on=both``), the ``selection``."""
    import torch

    path = run_dir / "best_model.pth"
    if not path.is_file():
        return None
    ckpt = torch.load(path, weights_only=True)
    if "postprocess_tuning" not in ckpt:
        return None
    return {**ckpt["postprocess_tuning"], "epoch": ckpt.get("epoch"),
            **({"selection": ckpt["selection"]} if "selection" in ckpt else {})}


def retune(recipe: Recipe, task_dir: Path, run_dir: Path, result: dict) -> dict:
    """A ``seg train`` run finished before ``seg train`` chose its threshold and post-processing:
    rerun its command (resuming the finished run, which trains nothing and makes only that
    choice, on the same weights and validation images), then score the test images again."""
    log = run_dir / "log.txt"
    recipe.train(task_dir, run_dir, result["epochs_planned"], result["seed"], log, resume=True)
    result = {**result, "mean_dice_before_retune": result["mean_dice"], "retuned": True,
              **_score(run_dir, task_dir, log), **_postprocessed(run_dir, task_dir, log),
              "train_tuning": _train_tuning(run_dir)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_one(recipe: Recipe, task_dir: Path, work: Path, epochs: int, seed: int, retune_old: bool = False) -> dict:
    run_dir = work / "runs" / f"{task_dir.name}-{recipe.name}-seed{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        tunes = recipe.overrides is not None and "train.tune_postprocessing=false" not in recipe.overrides
        if retune_old and tunes and "train_tuning" not in result:
            result = retune(recipe, task_dir, run_dir, result)
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    log.write_text("")
    load_before = os.getloadavg()[0]
    wall, cpu = recipe.train(task_dir, run_dir, epochs, seed, log)
    load = (load_before + os.getloadavg()[0]) / 2
    rows = _read_csv(run_dir / "history.csv")
    dice = [r["dice"] for r in rows]
    result = {"task": task_dir.name, "recipe": recipe.name, "seed": seed, "epochs_planned": epochs,
              "epochs_run": len(rows), "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
              "load_avg": round(load, 1),
              "best_val_dice": max(dice),
              "final_val_dice": dice[-1], "max_val_drop_after_20pct": max_drop(dice),
              "overrides": recipe.overrides, **_score(run_dir, task_dir, log), **_postprocessed(run_dir, task_dir, log),
              "train_tuning": _train_tuning(run_dir)}
    if "raw_dice" in rows[0]:  # the raw (non-EMA) curve of a run that validates the EMA weights
        result["max_raw_val_drop_after_20pct"] = max_drop([r["raw_dice"] for r in rows])
    done.write_text(json.dumps(result, indent=1))
    return result


def _steps(threshold: float, p: dict) -> str:
    """A threshold and post-processing for a table cell, e.g. 't=0.55, min 16'."""
    return ", ".join([f"t={threshold:g}"] + (["fill"] if p["fill_holes"] else []) + (
        [f"min {p['min_size']}"] if p["min_size"] else []) + ([f"top {p['keep_largest']}"] if p["keep_largest"] else []))


def _pp_cell(r: dict) -> str:
    if "pp" not in r:
        return ""
    return f"{r['pp_mean_dice']:.4f} ({_steps(r['pp']['threshold'], r['pp'])})"


def _train_choice_cell(r: dict) -> str:
    t = r.get("train_tuning")
    if not t:
        return "-"
    cell = _steps(t["threshold"], t["postprocess"]) + (" (chosen by rerunning)" if r.get("retuned") else "")
    if "epoch" in t:
        cell += f"; epoch {t['epoch']}"
    if "selection" in t:  # two candidates: 'D' the highest val Dice, 'L' the lowest val loss
        (d, dl), (l_, ll) = [(c["epoch"], c["dice"]) for c in t["selection"]["candidates"]]
        cell += f" of D{d} {dl:.4f} / L{l_} {ll:.4f}"
    return cell


def markdown(results: list[dict], budget: float, command: str) -> str:
    lines = [f"Budget {2 * budget:.0f} CPU seconds of training per run ({budget:.0f} s of a busy idle 2-core "
             f"machine; epochs from calibration runs of each recipe); command: `{command}`", "",
             "| task | recipe | seed | epochs run/planned | train CPU s / wall s (load avg) | per-image mean Dice | "
             "pooled Dice | worst image | empty on foreground | max val drop after 20 % | "
             "seg train's choice in best_model.pth | "
             "mean Dice, threshold + post-processing tuned on validation by seg evaluate's grid |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['recipe']} | {r['seed']} | {r['epochs_run']}/{r['epochs_planned']} | "
                     f"{r['train_cpu_s']:.0f} / {r['train_wall_s']:.0f} ({r['load_avg']:.1f}) | "
                     f"{r['mean_dice']:.4f} | {r['pooled_dice']:.4f} | "
                     f"{r['worst_dice']:.4f} | {r['empty_on_foreground']}/{r['n_test_foreground']} | "
                     f"{r['max_val_drop_after_20pct']:.3f} | {_train_choice_cell(r)} | {_pp_cell(r)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/accuracy"), help="data, runs and logs go here")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--recipes", nargs="+", default=["reference", "seg_before", "seg_new"],
                    help="reference, seg_before, seg_new and names given by --variant")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="an extra seg train recipe: name and space-separated dotted overrides")
    ap.add_argument("--calibrate_as", action="append", default=[], metavar="NAME=OTHER",
                    help="give recipe NAME the epochs calibrated for OTHER (same network and per-epoch work, "
                         "e.g. variants differing only in lr or schedule): saves its calibration runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every recipe but seg_new")
    ap.add_argument("--new_seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of seg_new")
    ap.add_argument("--budget_s", type=float, default=240.0,
                    help="training budget per run: seconds of a busy 2-core machine (2x this in CPU seconds)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--retune", action="store_true",
                    help="finished seg train runs from before seg train chose its threshold and post-processing: "
                         "rerun their command for that choice alone and score them again")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--markdown", type=Path, help="write the table here")
    args = ap.parse_args()
    work = args.work.resolve()
    recipes = {"reference": Recipe("reference", None, args), "seg_before": Recipe("seg_before", BEFORE, args),
               "seg_new": Recipe("seg_new", [], args)}
    for text in args.variant:
        name, _, overrides = text.partition("=")
        recipes[name] = Recipe(name, overrides.split(), args)
    unknown = [r for r in args.recipes if r not in recipes]
    if unknown:
        ap.error(f"unknown recipes {unknown}; give them with --variant NAME='overrides'")
    results = []
    for task in args.tasks:
        task_dir = work / "tasks" / task
        counts = write_task(task, work / "tasks")
        if not (task_dir / "shards" / "dataset.json").is_file():
            _run([*SEG_BIN, "prepare", "--pairs", str(task_dir / "pairs.csv"), "--out", str(task_dir / "shards"),
                  "--shard_size", "8", "--workers", "1", "--no_progress", "--overwrite"], work / "prepare.log")
        print(f"[{task}] {counts}", flush=True)
        plans = {}
        same = dict(text.partition("=")[::2] for text in args.calibrate_as)
        for name in args.recipes:  # calibrations back to back: the same machine load for each recipe
            cal = _calibrate(recipes[same.get(name, name)], task_dir, work)
            plans[name] = max(2, int((2 * args.budget_s - cal["fixed_cpu_s"]) / cal["per_epoch_cpu_s"]))
            print(f"[{task}] {name}: {cal['per_epoch_cpu_s']:.1f} CPU s/epoch + {cal['fixed_cpu_s']:.1f} CPU s "
                  f"fixed -> {plans[name]} epochs", flush=True)
        for name in args.recipes:
            for seed in (args.new_seeds if name == "seg_new" else args.seeds):
                r = run_one(recipes[name], task_dir, work, plans[name], seed, args.retune)
                results.append(r)
                print(f"[{task}] {name} seed {seed}: mean Dice {r['mean_dice']:.4f}, pooled {r['pooled_dice']:.4f}, "
                      f"worst {r['worst_dice']:.4f}, empty {r['empty_on_foreground']}/{r['n_test_foreground']}, "
                      f"drop {r['max_val_drop_after_20pct']:.3f}, {r['epochs_run']} epochs in {r['train_cpu_s']:.0f} CPU s "
                      f"/ {r['train_wall_s']:.0f} s",
                      flush=True)
    command = "python " + shlex.join(["tools/bench/accuracy_bench.py", *sys.argv[1:]])
    if args.json:
        args.json.write_text(json.dumps({"command": command, "budget_s": args.budget_s, "width": args.width,
                                         "size": args.size, "results": results}, indent=1))
    table = markdown(results, args.budget_s, command)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
