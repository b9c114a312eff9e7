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


def record(code: int) -> None:
    """Write this rank's exit code under $SEG_EXIT_DIR (atomic: temp name, then rename)."""
    folder = os.environ.get("SEG_EXIT_DIR")
    if not folder:
        return
    from seg.fileio import atomic_write_text

    atomic_write_text(Path(folder) / f"rank-{os.environ.get('RANK', '0')}", f"{code}\n")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: worker.py MODULE [ARGS...]   e.g. worker.py seg.train --config configs/cpu-smoke.yaml")
    module_name, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module_name, *args]
    # The module's main() is called here (not run as __main__), so that this rank's exit code
    # is recorded before seg.cli.run_command ends the process (without the interpreter's
    # teardown, and with the DataLoader workers killed: see seg/cli.py).
    from seg.cli import run_command

    run_command(lambda: importlib.import_module(module_name).main(args), on_exit=record)


if __name__ == "__main__":
    main()
