"""Does ``qc_score`` find the failures? A labelled benchmark with a distribution shift.

    python tools/bench/qc_bench.py --work /tmp/qc_bench [--test_seed 11]

1. Train a tiny U-Net (width 8, 64 px) on the demo data (``seg demo-data``, 320 images, seed 0:
   the training range of object sizes and contrasts).
2. Predict a labelled test set (``seg predict`` with QC, then ``--summarize``): 360 images from
   the training distribution plus 40 shifted ones (object size x0.3-2.2 and contrast x0.15-1,
   drawn per image, ``seg demo-data --size_scale --contrast``), all generated from
   ``--test_seed``; the set is fixed by that random seed before anything is measured.
3. ``seg evaluate --pred_dir --gt_dir``: the ``qc`` key of evaluation_report.json (AUROC of
   qc_score for Dice < 0.8 and < 0.5, Spearman with Dice, share of the failures among the lowest
   5 % and 10 %) and report.html.

Targets: AUROC >= 0.85 for Dice < 0.8, and the lowest 5 % holding at least half of those
failures. Prints the figures and a JSON summary; the trained model is kept in ``--work`` and
reused by later runs (``--retrain`` to train again).
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


def seg(*args, quiet: bool = True) -> str:
    cmd = [sys.executable, "-m", "seg.cli", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if not quiet:
        print(out.stdout.strip(), flush=True)
    return out.stdout


def train(work: Path, epochs: int, retrain: bool) -> Path:
    model = work / "run" / "best_model.pth"
    if model.is_file() and not retrain:
        print(f"reusing {model}", flush=True)
        return model
    shutil.rmtree(work / "run", ignore_errors=True)
    if not (work / "train_raw" / "images").is_dir():
        seg("demo-data", work / "train_raw", "--n", 320, "--size", 64, "--seed", 0)
    if not (work / "shards" / "dataset.json").is_file():
        seg("prepare", "--images", work / "train_raw" / "images", "--masks",
            work / "train_raw" / "masks", "--out", work / "shards", "--val_split", 0.2, "--overwrite")
    start = time.perf_counter()
    seg("train", "--data_dir", work / "shards", "--checkpoint_dir", work / "run", "--epochs", epochs,
        "--batch_size", 8, "--image_size", 64, "--num_workers", 1, "model.base_channels=8", "train.save_every=0")
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    return model


def test_set(work: Path, seed: int, n_in: int, n_shift: int) -> Path:
    test = work / f"test_seed{seed}"
    if not (test / "masks").is_dir():
        seg("demo-data", test, "--n", n_in, "--size", 64, "--seed", seed, "--prefix", "in_")
        seg("demo-data", test, "--n", n_shift, "--size", 64, "--seed", seed + 1000, "--prefix", "shift_",
            "--size_scale", 0.3, 2.2, "--contrast", 0.15, 1.0)
    return test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/qc_bench")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--test_seed", type=int, default=11)
    parser.add_argument("--n_in", type=int, default=360)
    parser.add_argument("--n_shift", type=int, default=40)
    parser.add_argument("--tta", action="store_true", help="predict with flip TTA (adds the flip agreement)")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = train(work, args.epochs, args.retrain)
    test = test_set(work, args.test_seed, args.n_in, args.n_shift)
    tag = f"seed{args.test_seed}" + ("_tta" if args.tta else "")
    pred, ev = work / f"pred_{tag}", work / f"eval_{tag}"
    shutil.rmtree(pred, ignore_errors=True)
    seg("predict", "--model_path", model, "--image_dir", test / "images", "--output_dir", pred, "--no_progress",
        "--num_workers", 1, *(["--tta"] if args.tta else []))
    seg("predict", "--summarize", pred, quiet=False)
    seg("evaluate", "--pred_dir", pred, "--gt_dir", test / "masks", "--image_dir", test / "images",
        "--output_dir", ev, "--no_progress", quiet=False)
    doc = json.loads((ev / "evaluation_report.json").read_text())
    qc = doc["qc"]
    per = {p["id"]: p["dice"] for p in doc["per_image"]}
    by_part = {part: [d for k, d in per.items() if k.startswith(part)] for part in ("in_", "shift_")}
    result = {"images": doc["n_images"], "mean_dice": round(doc["mean"]["dice"], 4),
              "mean_dice_in_distribution": round(sum(by_part["in_"]) / max(len(by_part["in_"]), 1), 4),
              "mean_dice_shifted": round(sum(by_part["shift_"]) / max(len(by_part["shift_"]), 1), 4),
              "spearman": qc["spearman_dice"], "tta": args.tta, "test_seed": args.test_seed,
              **{name: {k: v for k, v in d.items()} for name, d in qc["detection"].items()},
              "flags": qc["flags"], "report": str(ev / "report.html")}
    d8 = qc["detection"]["dice_below_0.8"]
    print(f"{doc['n_images']} test images (mean Dice {result['mean_dice_in_distribution']} in distribution, "
          f"{result['mean_dice_shifted']} shifted); Dice < 0.8: {d8['failures']} images, AUROC {d8['auroc']}, "
          f"lowest 5 % hold {d8['lowest_5pct']['captured']} of them (precision {d8['lowest_5pct']['precision']}), "
          f"lowest 10 % {d8['lowest_10pct']['captured']}; Spearman {qc['spearman_dice']}", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
