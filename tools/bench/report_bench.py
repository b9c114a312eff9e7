"""Build time and size of the HTML report for a 100,000-image cohort.

    python tools/bench/report_bench.py --work /tmp/report_bench [--copies 100]

A real `seg predict` run of 1,000 tiny (32 px) images with a tiny model (width 4) is copied
``--copies`` times into a synthetic 100,000-image prediction folder: the manifest's records are
those of the real run with the inputs and outputs renamed into ``c{k}/`` folders (symbolic
links to the real images and masks, so the worst cases' files are really read) and each
copy's ``qc_score``s jittered (+-0.02, so the worst 100 are spread over copies). The
predictions themselves are not recomputed 100 times: predicting 100,000 images on 2 cores
takes about a minute and would measure `seg predict`, not the report.

Measures ``seg report`` as a whole process (start-up included) and in-process, the page's
size and the sibling folder's size. Targets: under 60 s, under 20 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools" / "bench")]


def real_run(work: Path, n: int) -> Path:
    from predict_bench import checkpoint, make_images  # tools/bench/predict_bench.py

    images = make_images(work / f"tiny{n}", n, 32, ext=".png")
    ckpt = checkpoint(work / "unet_base4_32.pth", 4, 32)
    pred = work / "real_pred"
    if not (pred / "manifest.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "seg.predict", "--model_path", str(ckpt), "--image_dir", str(images),
                        "--output_dir", str(pred), "--no_progress", "--batch_size", "64", "--num_workers", "1"],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    return pred


def synthesise(real: Path, big: Path, copies: int) -> int:
    shutil.rmtree(big, ignore_errors=True)
    big.mkdir(parents=True)
    records = [json.loads(line) for line in (real / "manifest.jsonl").read_text().splitlines() if line.strip()]
    images_dir = Path(records[0]["images"][0]["input"]).resolve().parent
    rng = random.Random(0)
    total_units = copies * len(records)
    lines, n = [], 0
    for k in range(copies):
        os.symlink(real.resolve(), big / f"c{k}")
        os.symlink(images_dir, big / f"in{k}")
        for j, rec in enumerate(records):
            images = []
            for image in rec["images"]:
                qc = dict(image["qc"])
                qc["score"] = round(min(1.0, max(0.0, qc["score"] + rng.uniform(-0.02, 0.02))), 4)
                images.append({**image, "input": str(big / f"in{k}" / Path(image["input"]).name),
                               "output": f"c{k}/{image['output']}", "qc": qc})
                n += 1
            lines.append(json.dumps({**rec, "unit": f"{rec['unit']}-c{k}", "index": k * len(records) + j,
                                     "num_units": total_units, "images": images}, separators=(",", ":")))
    (big / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    if (real / "prediction.json").is_file():
        shutil.copy(real / "prediction.json", big / "prediction.json")
    return n


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/report_bench")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=100)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    real = real_run(work, args.n)
    big = work / "cohort"
    n = synthesise(real, big, args.copies)
    out = work / "report.html"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "seg.report", str(big), "--out", str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    page, files = out.stat().st_size, folder_bytes(work / "report_files")
    result = {"images": n, "seconds_whole_process": round(seconds, 2), "page_mb": round(page / 1e6, 3),
              "files_mb": round(files / 1e6, 3), "total_mb": round((page + files) / 1e6, 3),
              "stdout": proc.stdout.strip()}
    print(f"report of {n:,} images: {seconds:.1f} s whole process, page {page / 1e6:.2f} MB + "
          f"{files / 1e6:.2f} MB of full-size overlays ({proc.stdout.strip()})", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
