"""Progress reporting fit for a terminal and for a batch log: one factory for every command.

    bar = progress_bar(total=500, desc="epoch 1/10", unit="batch", disable=not main)
    with bar:
        for ...:
            bar.update(1)
            bar.set_postfix(loss="0.3412")
    write_line("epoch 1/10 ...")   # a log line that does not break a bar

Design choices:
- On a terminal (stderr is a TTY) :func:`progress_bar` returns a real ``tqdm`` bar. Anywhere
  else (an sbatch log, a pipe, a file) it returns :class:`LineProgress`, which writes one plain
  line at most every ``SEG_PROGRESS_INTERVAL`` seconds (default 30) and a final line when it
  closes, with no carriage returns: tqdm's redraws of a 10-hour run would fill a Slurm log with
  megabytes of ``\\r`` frames that no one can read.
- A line is written only from ``update()`` (no timer thread): nothing can outlive the bar or
  write after the process has reported its result; a step longer than the interval gives one
  line per step.
- Lines carry the wall-clock time (logs interleave several processes and restarts), the count,
  the percentage, elapsed and remaining time, the rate over this run, and tqdm-style postfix.
- :func:`write_line` prints through ``tqdm.write`` (a bar on the terminal is cleared and redrawn
  around the line) and flushes, so a block-buffered batch log shows the line at once.
- :class:`LineProgress` offers the part of tqdm's interface the package uses: ``update``,
  ``set_postfix``, ``set_postfix_str``, ``set_description``, ``refresh``, ``close``, ``n``,
  ``total``, the context manager and ``write``. Other tqdm keyword arguments (``position``,
  ``leave``, ``dynamic_ncols``, ``mininterval``) are accepted and ignored: they are about
  drawing a bar.
"""

from __future__ import annotations

import os
import sys
import time
from numbers import Number
from typing import IO

from tqdm import tqdm

INTERVAL_ENV = "SEG_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def interval_seconds() -> float:
    """Seconds between two progress lines: ``$SEG_PROGRESS_INTERVAL``, default 30.

    Raises:
        ValueError: the variable is not a number of seconds >= 0; the message names it.
    """
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise ValueError(f"{INTERVAL_ENV}={text!r} is not a number of seconds >= 0 "
                         f"(e.g. {INTERVAL_ENV}=30, or unset it for {DEFAULT_INTERVAL_S:g} s)")
    return value


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def write_line(text: str, file: IO[str] | None = None) -> None:
    """Print a log line (default to stdout) without breaking a terminal bar; flushed at once.

    Args:
        text: the line (a trailing newline is added).
        file: the stream; default ``sys.stdout``.
    """
    out = sys.stdout if file is None else file
    tqdm.write(text, file=out)
    out.flush()


def progress_bar(total: float | None = None, desc: str | None = None, unit: str = "it", disable: bool = False,
                 initial: float = 0, file: IO[str] | None = None, interval: float | None = None, **tqdm_kwargs):
    """A tqdm bar on a terminal, a :class:`LineProgress` everywhere else.

    Args:
        total: expected count; None when unknown.
        desc: label at the start of the bar or line.
        unit: what is counted ("batch", "img", "pair").
        disable: show nothing.
        initial: the count to start from (a resumed epoch).
        file: the stream; default ``sys.stderr`` (tqdm's default). Its ``isatty()`` decides.
        interval: seconds between lines when not a terminal; default :func:`interval_seconds`.
        tqdm_kwargs: passed to tqdm on a terminal (``position``, ``leave``, ``dynamic_ncols``, ...).
    """
    stream = sys.stderr if file is None else file
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=stream, **tqdm_kwargs)
    return LineProgress(total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=stream,
                        interval=interval)


class LineProgress:
    """Progress as plain lines: at most one per ``interval`` seconds, and one when closed.

    Args: as :func:`progress_bar` (``file`` is the stream the lines go to).
    """

    write = staticmethod(write_line)

    def __init__(self, total: float | None = None, desc: str | None = None, unit: str = "it",
                 disable: bool = False, initial: float = 0, file: IO[str] | None = None,
                 interval: float | None = None, **_drawing) -> None:
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.disable = disable
        self.n = initial
        self._start_n = initial
        self.file = sys.stderr if file is None else file
        self.interval = interval_seconds() if interval is None else float(interval)
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self.closed = False

    def update(self, n: float = 1) -> None:
        """Count ``n`` more; writes a line when ``interval`` seconds passed since the last one."""
        if self.disable or self.closed:
            return
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval and not (self.total and self.n >= self.total):
            self._emit(now, final=False)  # the count complete: the final line follows at close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """``key=value`` pairs after the count, formatted as tqdm does (numbers to 3 digits)."""
        items = dict(ordered_dict or {})
        items.update(sorted(kwargs.items()))
        self.postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, Number) else str(v).strip()}"
                                 for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw: lines are written by ``update`` and ``close``."""

    def close(self) -> None:
        """Write the final line (count, elapsed time, rate) once."""
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            self._emit(time.monotonic(), final=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def format_line(self, now: float, final: bool = False) -> str:
        """The line for the state at monotonic time ``now``; ``final`` omits the time left."""
        elapsed = now - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{_num(self.n)}/{_num(self.total)} {self.unit}" if self.total else f"{_num(self.n)} {self.unit}"
        parts = [count + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        if not final and self.total and rate > 0 and self.n < self.total:
            parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        return f"[{stamp}] {self.desc + ': ' if self.desc else ''}{', '.join(parts)}{' (end)' if final else ''}"

    def _emit(self, now: float, final: bool) -> None:
        self._last = now
        try:
            self.file.write(self.format_line(now, final) + "\n")
            self.file.flush()
        except ValueError:  # the stream was closed (interpreter shutdown): progress is not worth an error
            pass


def _num(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
