"""The exit codes of every `seg` command, in one table.

Scripts (``slurm/*.sbatch``, ``launch/submit.py``) and users branch on these numbers, so they
are fixed here and documented in ``docs/FORMATS.md``. This module imports nothing heavy: the
launchers read it without importing torch.
"""

OK = 0
"""The job finished."""

FAILED = 1
"""The job stopped on an error while running (a corrupt shard, a crashed rank, an incomplete
cohort found by ``seg predict --summarize``); the message on stderr names the cause."""

USAGE = 2
"""Invalid arguments, configuration or input data, found before any work started."""

FAILED_INPUTS = 3
"""``seg predict``: some inputs could not be read (listed in ``failures.jsonl``); all others are done."""

PREEMPTED = 75
"""EX_TEMPFAIL: SIGUSR1/SIGTERM received (Slurm preemption or time limit); state was saved,
rerun the same command to continue."""

TABLE = {OK: "done", FAILED: "error while running", USAGE: "invalid arguments, configuration or data",
         FAILED_INPUTS: "some inputs could not be read (failures.jsonl)",
         PREEMPTED: "preempted: state saved, rerun to resume"}


class RunFailed(Exception):
    """An error found while the job was running (not in its arguments or input checks): the
    command prints the message and exits with ``FAILED``."""
