"""Headless Chromium for the report tests: find (or install) it, render a page, read it back.

Skip or fail, decided here: without a browser the tests skip with the reason, except when
``CI=true`` or ``SEG_BROWSER=1`` (``tools/test.sh`` installed one): then they fail. Where the
machine allows it (root and apt-get) the fixture installs it with ``tools/chromium.sh install``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def browser_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("SEG_BROWSER") == "1"


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        out = subprocess.run(["bash", str(ROOT / "tools" / "chromium.sh"), "install"], capture_output=True,
                             text=True, timeout=900)
        path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        if path is None:
            reason = f"no Chromium and it could not be installed: {out.stderr.strip()[-500:]}"
            if browser_required():
                pytest.fail(f"a browser is required here (CI=true or SEG_BROWSER=1) but {reason}")
            pytest.skip(f"browser tests skipped: {reason}")
    return path


def _run(chromium: str, tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile per start
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dump_dom(chromium: str, page: Path, tmp: Path) -> str:
    """The DOM after the page's load event (``--dump-dom``)."""
    out = _run(chromium, tmp, ["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()])
    assert out.returncode == 0 and "<html" in out.stdout, f"chromium --dump-dom failed: {out.stderr[-2000:]}"
    return out.stdout


def screenshot(chromium: str, page: Path, tmp: Path, size=(1280, 1600)) -> np.ndarray:
    """An RGB screenshot of the page (``--screenshot``)."""
    png = tmp / "screenshot.png"
    out = _run(chromium, tmp, [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
                               "--virtual-time-budget=5000", page.resolve().as_uri()])
    assert png.is_file(), f"chromium --screenshot wrote nothing: {out.stderr[-2000:]}"
    return cv2.cvtColor(cv2.imread(str(png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
