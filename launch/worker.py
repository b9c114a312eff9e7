"""One worker process under torchrun: run a ``seg`` module's main and record its exit code.

    torchrun ... launch/worker.py seg.train --config FILE [overrides]

Why this exists: torchrun reports any worker failure as its own exit code 1, and when it
receives SIGTERM/SIGUSR1 it re-raises the signal after shutting its workers down. So the
launcher's exit code cannot tell "preempted, state saved" (the workers' code 75) from a
crash. Each worker therefore writes ``$SEG_EXIT_DIR/rank-$RANK`` holding its exit code;
``slurm/train.sbatch`` requeues the job only when a rank exited 75 and none failed otherwise.
Without ``SEG_EXIT_DIR`` nothing is written and this is a plain ``python -m MODULE``.

The module's main() runs in this process, so signals reach the trainer directly. This file
lives outside ``seg/``: it reads RANK only to name its file.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    return 1  # sys.exit("message") prints the message and exits 1


def record(code: int) -> None:
    """Write this rank's exit code under $SEG_EXIT_DIR (atomic: temp name, then rename)."""
    folder = os.environ.get("SEG_EXIT_DIR")
    if not folder:
        return
    path = Path(folder) / f"rank-{os.environ.get('RANK', '0')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{code}\n")
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: worker.py MODULE [ARGS...]   e.g. worker.py seg.train --config configs/cpu-smoke.yaml")
    module_name, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module_name, *args]
    # The module's main() is called here (not run as __main__): a module whose entry point ends
    # the process itself (seg.train's exit_now skips the interpreter teardown) would otherwise
    # exit before this rank's code is recorded.
    module = importlib.import_module(module_name)
    code = 1
    try:
        code = int(module.main(args) or 0)
    except SystemExit as exc:
        code = _exit_code(exc)
        raise
    finally:
        record(code)
    getattr(module, "exit_now", sys.exit)(code)


if __name__ == "__main__":
    main()
