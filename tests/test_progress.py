"""seg/progress.py: plain interval lines when stderr is not a terminal (batch logs), a tqdm bar
on a terminal (a real pty), and the call sites using it."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from seg.progress import INTERVAL_ENV, LineProgress, interval_seconds, progress_bar, write_line

CHILD = """
import sys, time
from seg.progress import progress_bar, write_line
start = time.monotonic()
with progress_bar(total=30, desc="demo", unit="step") as bar:
    for i in range(30):
        time.sleep(0.02)
        bar.update(1)
        bar.set_postfix(loss=1.0 / (i + 1))
    write_line("a log line")
print(type(bar).__module__, type(bar).__name__, round(time.monotonic() - start, 3))
"""
LINE = re.compile(r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\] demo: (\d+)/30 step \(\d+%\), \d\d:\d\d elapsed, .*step/s, loss=")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.timeout(60)
def test_pipe_gets_plain_lines_at_the_interval_and_no_carriage_return():
    out = subprocess.run([sys.executable, "-c", CHILD], env=_env(**{INTERVAL_ENV: "0.1"}),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kind, name, seconds = out.stdout.split()[-3:]
    assert (kind, name) == ("seg.progress", "LineProgress")
    assert "a log line" in out.stdout
    assert "\r" not in out.stderr
    lines = out.stderr.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[-1].endswith("(end)") and LINE.match(lines[-1])[1] == "30"
    interval_lines = lines[:-1]
    # 30 steps of >= 20 ms with a 0.1 s interval: a few lines, never more than one per interval
    assert 2 <= len(interval_lines) <= float(seconds) / 0.1 + 1, (seconds, lines)
    counts = [int(LINE.match(line)[1]) for line in lines]
    assert counts == sorted(counts) and counts[0] < 30


@pytest.mark.timeout(60)
def test_default_interval_writes_only_the_final_line():
    out = subprocess.run([sys.executable, "-c", CHILD], env={k: v for k, v in _env().items() if k != INTERVAL_ENV},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stderr.splitlines()) == 1 and "30/30 step (100%)" in out.stderr


@pytest.mark.timeout(60)
def test_terminal_gets_a_tqdm_bar():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], env=_env(**{INTERVAL_ENV: "0.1"}),
                                stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        slave = None
        drawn = b""
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    assert proc.returncode == 0
    assert stdout.split()[-3:-1] == ["tqdm.std", "tqdm"]
    assert b"\r" in drawn and b"30/30" in drawn and b"(end)" not in drawn


def test_line_format_unknown_total_postfix_and_disable():
    buf = io.StringIO()
    bar = LineProgress(total=None, desc="predict 1/2", unit="img", file=buf, interval=0)
    bar.update(3)
    bar.set_postfix({"b": "x"}, a=0.123456)
    bar.update(2)
    bar.close()
    bar.close()  # once only
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert re.search(r"\] predict 1/2: 3 img, 00:00 elapsed, [\d.e+-]+ img/s$", lines[0])
    assert lines[1].endswith("img/s, b=x, a=0.123") and "5 img" in lines[1]
    assert lines[2].endswith("(end)") and "left" not in lines[2]
    quiet = io.StringIO()
    with LineProgress(total=4, file=quiet, interval=0, disable=True) as off:
        off.update(4)
    assert quiet.getvalue() == ""


def test_resumed_count_and_time_left():
    buf = io.StringIO()
    bar = LineProgress(total=100, desc="epoch 2/5", unit="batch", initial=40, file=buf, interval=0)
    bar._start -= 10  # 10 s ago: 10 batches in 10 s
    bar.update(10)
    assert "50/100 batch (50%), 00:10 elapsed, 00:50 left, 1 batch/s" in buf.getvalue()
    bar.update(50)  # complete: no interval line, the final line comes from close()
    assert "100/100" not in buf.getvalue()
    bar.close()
    assert len(buf.getvalue().splitlines()) == 2 and "100/100 batch (100%)" in buf.getvalue().splitlines()[-1]


def test_interval_env_is_checked(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_seconds() == 2.5
    monkeypatch.delenv(INTERVAL_ENV)
    assert interval_seconds() == 30
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{INTERVAL_ENV}='{bad}' is not a number of seconds"):
            progress_bar(total=3, file=io.StringIO())


def test_write_line_flushes_to_the_given_stream():
    buf = io.StringIO()
    write_line("hello", file=buf)
    assert buf.getvalue() == "hello\n"


def test_prepare_logs_plain_lines(tmp_path, capsys):
    """A call site: `seg prepare` under a non-terminal stderr (pytest's capture) writes lines."""
    from seg.data.synthetic import make_demo_dataset
    from seg.data.sharding import prepare_dataset

    make_demo_dataset(tmp_path / "d", n=6, size=32)
    capsys.readouterr()
    prepare_dataset(tmp_path / "d" / "images", tmp_path / "d" / "masks", tmp_path / "shards", shard_size=4,
                    workers=1, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"\] prepare: 6/6 pair \(100%\), .* \(end\)$", err.strip().splitlines()[-1]), err
