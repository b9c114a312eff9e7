"""The `seg` console command, and how every command's process ends.

One subcommand per job, each also runnable as ``python -m seg.<module>`` (what ``torchrun``
and ``accelerate launch -m`` start). The top-level module named after a command is that
command (``seg/train.py`` is `seg train`); the work lives in the packages. Subcommand modules
are imported lazily so that `seg --help` and light commands do not pay for importing torch.

Design choices for ending a process (``run_command``, ``exit_now``):

- Every error ends the process promptly with a non-zero code (``seg.exitcodes``) and the error
  on stderr, whatever its worker processes are doing. DataLoader workers ignore SIGTERM and
  SIGUSR1 (Slurm signals every process of a job; only the main process decides), so the
  interpreter's normal exit, which terminates (SIGTERM) and then joins its multiprocessing
  children, would wait for them forever. ``exit_now`` therefore kills this process's children
  (SIGKILL: the main process has decided to end, they hold nothing to save) and ends with
  ``os._exit``, skipping the interpreter's teardown (seconds of freeing modules once torch is
  loaded: docs/BENCHMARKS.md, "Measurements behind design choices"). Every file of a run is closed before that point,
  and threads that write (checkpoint plots, prediction writers) are joined by their owners.
- A closed stdout or stderr (a log pipe whose reader died) must not turn a preemption save
  into a crash: ``guard_streams`` drops writes to a broken stream instead of raising, so the
  job still saves its state and ends with its own exit code.
"""

from __future__ import annotations

import errno
import importlib
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Callable, NoReturn

from seg import exitcodes

# subcommand -> (module, one-line help). Each module exposes main(argv: list[str] | None) -> int.
SUBCOMMANDS = {
    "prepare": ("seg.prepare", "pair images with masks, validate them, write WebDataset shards"),
    "train": ("seg.train", "train the U-Net on shards (single process, accelerate launch, torchrun)"),
    "predict": ("seg.predict", "predict masks for a folder, file list, shards or one image"),
    "evaluate": ("seg.evaluate", "score predictions or a model against ground truth; report and plots"),
    "report": ("seg.report", "one HTML page to review a predicted cohort (QC, worst cases, evaluation)"),
    "doctor": ("seg.doctor", "preflight checks for a training or prediction run"),
    "demo-data": ("seg.demo_data", "write a synthetic images/ + masks/ data set"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: seg <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `seg <command> --help` for a command's options.", "",
              "exit codes: " + "; ".join(f"{code} {text}" for code, text in exitcodes.TABLE.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return exitcodes.OK
    if argv[0] in ("-V", "--version"):
        from seg import __version__

        print(f"seg {__version__}")
        return exitcodes.OK
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"seg: unknown command {name!r}; valid commands are {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return exitcodes.USAGE
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


class _GuardedStream:
    """A text stream whose writes are dropped, not raised, once its reader has gone (EPIPE)."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def _call(self, name: str, *args):
        if self.broken:
            return None
        try:
            return getattr(self._stream, name)(*args)
        except (BrokenPipeError, ConnectionResetError):
            self.broken = True
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self.broken = True
        return None

    def write(self, text: str) -> int:
        written = self._call("write", text)
        return len(text) if written is None else written

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Make stdout and stderr drop writes after their reader has gone, instead of raising."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _GuardedStream):
            setattr(sys, name, _GuardedStream(stream))


def stop_children(timeout: float = 5.0) -> None:
    """Kill this process's multiprocessing children (DataLoader and pool workers) and reap them.

    A DataLoader installs a SIGCHLD handler that raises ``RuntimeError`` in the main thread when
    one of its workers dies by a signal; the killing below would make it fire inside ``join``
    and abort the exit (into the interpreter's teardown, which can wait forever on a queue
    whose reader was killed). The default SIGCHLD disposition is restored first.
    """
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGCHLD here
        pass
    children = multiprocessing.active_children()
    for child in children:
        try:
            child.kill()
        except (OSError, ValueError):  # already gone, or closed
            pass
    for child in children:
        try:
            child.join(timeout)
        except (OSError, ValueError, AssertionError):
            pass


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` at once: children killed, streams flushed, no teardown.

    Only for a process's entry point (``python -m seg.<command>``, the ``seg`` script, a
    launcher's worker), never inside a caller's process: see the module docstring.
    """
    try:
        stop_children()
    except BaseException:  # noqa: BLE001 - nothing may keep this process from ending
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


def run_command(main_fn: Callable[[], int | None], on_exit: Callable[[int], None] | None = None) -> NoReturn:
    """Run a command's ``main`` as the process's entry point and end the process with its code.

    An exception that escapes ``main`` is printed (with its traceback) and ends the process
    with ``exitcodes.FAILED`` (130 for Ctrl-C); ``SystemExit`` keeps its code. ``on_exit``
    sees the final code first (``launch/worker.py`` records it for the sbatch script).
    """
    guard_streams()
    try:
        code = int(main_fn() or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else exitcodes.FAILED)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # noqa: BLE001 - the entry point: anything else is reported, then we end
        traceback.print_exc()
        code = exitcodes.FAILED
    if on_exit is not None:
        try:
            on_exit(code)
        except Exception:  # noqa: BLE001 - recording the code must not change it
            traceback.print_exc()
    exit_now(code)


def console_main() -> None:
    """The `seg` console script."""
    run_command(main)


if __name__ == "__main__":
    console_main()
