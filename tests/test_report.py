"""The HTML report (seg report, seg predict --summarize, seg evaluate) and its check in a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from browser_fixtures import chromium, dump_dom, screenshot  # noqa: F401 (fixture)
from predict_fixtures import make_checkpoint, random_image, write_image
from seg.evaluate import main as evaluate_main
from seg.predict import main as predict_main
from seg.report import main as report_main

N = 14


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """A predicted cohort with ground truth: (prediction folder, truth folder, tar prediction folder)."""
    root = tmp_path_factory.mktemp("report")
    ckpt = make_checkpoint(root / "m.pth")
    rng = np.random.default_rng(0)
    for i in range(N):
        image = random_image(40, 48, seed=i)
        write_image(root / "images" / f"case{i:02d}.png", image)
        truth = image[..., 0] > (100 + 10 * i)  # some truths agree with the model, some do not
        truth[rng.integers(0, 40), :] = True
        write_image(root / "truth" / f"case{i:02d}_mask.png", truth.astype(np.uint8) * 255)
    common = ["--model_path", str(ckpt), "--image_dir", str(root / "images"), "--unit_size", "5",
              "--num_workers", "0", "--no_progress"]
    assert predict_main([*common, "--output_dir", str(root / "pred")]) == 0
    assert predict_main([*common, "--output_dir", str(root / "pred_tar"), "--format", "tar", "--tta"]) == 0
    return root / "pred", root / "truth", root / "pred_tar"


def cases(html: str) -> list[str]:
    return re.findall(r'<div class="case" data-score="([0-9.]+)"', html)


@pytest.mark.timeout(300)
def test_summarize_writes_a_self_contained_report_with_the_worst_cases(predicted):
    pred, _, _ = predicted
    assert predict_main(["--summarize", str(pred), "--report_worst", "5"]) == 0
    page = pred / "report.html"
    html = page.read_text()
    for element in ('id="summary"', 'id="hist-foreground"', 'id="hist-qc"', 'id="flag-table"', 'id="worst-cases"',
                    'id="lowest-table-rows"'):
        assert element in html
    scores = [float(s) for s in cases(html)]
    assert len(scores) == 5 and scores == sorted(scores)
    qc = [json.loads(line) for line in (pred / "manifest.jsonl").read_text().splitlines()]
    all_scores = sorted(i["qc"]["score"] for r in qc for i in r["images"])
    assert scores == all_scores[:5]  # the five lowest of the cohort
    counts = re.search(r'id="hist-qc" data-counts="([0-9,]+)"', html).group(1)
    assert sum(map(int, counts.split(","))) == N
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from the network
    links = re.findall(r'<a href="([^"]+)"><img src="data:image/jpeg;base64,', html)
    assert len(links) == 5 and all((pred / link).is_file() for link in links)
    assert "model sha256" in html and "prediction settings and training config" in html


@pytest.mark.timeout(300)
def test_seg_report_with_ground_truth_and_tar_outputs(predicted, tmp_path):
    pred, truth, pred_tar = predicted
    out = tmp_path / "review" / "review.html"
    out.parent.mkdir()
    assert report_main([str(pred_tar), "--out", str(out), "--worst", "4", "--table_rows", "3"]) == 0
    html = out.read_text()
    assert len(cases(html)) == 4  # thumbnails read from the unit tars
    links = re.findall(r'<a href="([^"]+)"><img', html)
    assert len(links) == 4 and all((out.parent / link).is_file() and link.startswith("review_files/")
                                   for link in links)
    table = html[html.index('id="lowest-table-rows"'):]
    assert table.count("<tr>") == 1 + 3  # header + capped rows
    assert 'id="evaluation"' not in html and "Dice &middot;" not in html

    with_truth = tmp_path / "truth.html"
    assert report_main([str(pred), "--gt_dir", str(truth), "--out", str(with_truth), "--worst", "4"]) == 0
    html = with_truth.read_text()
    for element in ('id="evaluation"', 'id="metrics-table"', 'id="qc-detection"', 'id="scatter-qc-dice"',
                    'id="hist-dice"'):
        assert element in html
    assert len(re.findall(r"&middot; Dice [0-9.]+", html)) == 4  # each shown case with its Dice
    assert report_main([str(tmp_path / "nothing")]) == 2


@pytest.mark.timeout(300)
def test_seg_evaluate_on_a_prediction_folder_reports_the_qc(predicted, tmp_path):
    pred, truth, _ = predicted
    out = tmp_path / "eval"
    assert evaluate_main(["--pred_dir", str(pred), "--gt_dir", str(truth), "--output_dir", str(out),
                          "--no_progress"]) == 0
    doc = json.loads((out / "evaluation_report.json").read_text())
    assert list(doc)[:7] == ["n_images", "threshold", "global", "mean", "std", "empty_policy", "per_image"]
    qc = doc["qc"]
    assert qc["n_images"] == N and set(qc["detection"]) == {"dice_below_0.8", "dice_below_0.5"}
    for det in qc["detection"].values():
        assert set(det) == {"failures", "auroc", "lowest_5pct", "lowest_10pct"}
        assert det["auroc"] is None or 0 <= det["auroc"] <= 1
    assert (out / "qc_vs_dice.png").is_file() and (out / "report.html").is_file()
    assert "quality control: qc_score against Dice" in (out / "evaluation_report.txt").read_text()
    assert 'id="qc-detection"' in (out / "report.html").read_text()


@pytest.mark.timeout(600)
def test_report_renders_in_headless_chromium(predicted, chromium, tmp_path):  # noqa: F811
    pred, truth, _ = predicted
    page = tmp_path / "page.html"
    assert report_main([str(pred), "--gt_dir", str(truth), "--out", str(page), "--worst", "6"]) == 0
    images_in_page = page.read_text().count("<img ")
    dom = dump_dom(chromium, page, tmp_path)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == images_in_page >= 6  # every thumbnail decoded
    assert len(cases(dom)) == 6 and 'id="scatter-qc-dice"' in dom
    shot = screenshot(chromium, page, tmp_path)
    header = shot[5:40, 5:400].reshape(-1, 3).astype(int)
    assert np.abs(header - [0x1f, 0x3a, 0x5f]).max(axis=1).mean() < 0.2 or \
        (np.abs(header - [0x1f, 0x3a, 0x5f]).max(axis=1) <= 3).mean() > 0.8  # the header bar
    orange = (np.abs(shot.astype(int) - [0xd4, 0x80, 0x2a]).max(axis=2) <= 4).sum()
    assert orange > 50  # the qc_score histogram's bars are drawn
    red = ((shot[..., 0] > 150) & (shot[..., 1] < 110) & (shot[..., 2] < 110)).sum()
    assert red > 200  # overlay thumbnails (mask tinted red) are painted
