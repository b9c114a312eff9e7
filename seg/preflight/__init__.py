"""Preflight checks behind `seg doctor` (``seg/doctor.py`` is the command).

Modules: ``checks`` (config, shards, pairs, rendezvous, devices), ``slurm`` (sbatch scripts),
``outputs`` (a planned prediction: inputs, units, output files, disk). Each check is a plain
function returning ``Check`` records, so tests and other tools can call them one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("ok", "warn", "fail")


@dataclass(frozen=True)
class Check:
    """One finding: ``status`` is 'ok', 'warn' or 'fail'; ``fix`` says what to do when not ok."""

    status: str
    name: str
    message: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Check.status={self.status!r}; valid values are {', '.join(STATUSES)}")

    def format(self) -> str:
        label = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        text = f"{label}  {self.name:<11} {self.message}"
        if self.fix and self.status != "ok":
            text += f"\n      {'':<11} fix: {self.fix}"
        return text
