"""Doctor checks of an sbatch script: the settings that make a long run preemption-safe.

Slurm reads ``#SBATCH`` lines only up to the first command, and options given on the sbatch
command line override them; the check reads the script as Slurm would.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from seg.preflight import Check
from seg.slurm_time import slurm_seconds

SIGNAL_RE = re.compile(r"^(?:(?P<where>[BR]):)?(?P<sig>[A-Z0-9]+)(?:@(?P<sec>\d+))?$")


def parse_sbatch_options(text: str) -> dict[str, str]:
    """``{"--signal": "B:USR1@120", "--requeue": "", ...}`` from the ``#SBATCH`` header.

    Args:
        text: the script. Long options only (``--name=value`` or ``--name value``); short
            options are kept under their own spelling (``-N``).
    """
    options: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        if not stripped.startswith("#SBATCH"):
            break  # Slurm stops at the first command
        words = shlex.split(stripped[len("#SBATCH"):], comments=True)
        i = 0
        while i < len(words):
            word = words[i]
            if "=" in word:
                key, value = word.split("=", 1)
            elif i + 1 < len(words) and not words[i + 1].startswith("-"):
                key, value = word, words[i + 1]
                i += 1
            else:
                key, value = word, ""
            options[key] = value
            i += 1
    return options


def check_sbatch(path: str) -> list[Check]:
    """--signal (B: when the script traps it), --requeue, --open-mode=append, --time, log folder."""
    script = Path(path)
    if not script.is_file():
        return [Check("fail", "sbatch", f"{path} does not exist", "give the path of the sbatch script")]
    text = script.read_text()
    out: list[Check] = []
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if syntax.returncode:
        out.append(Check("fail", "sbatch", f"{path}: bash syntax error: {syntax.stderr.strip()}",
                         "fix the line named above"))
    opts = parse_sbatch_options(text)
    traps = re.search(r"^\s*trap\s", text, re.MULTILINE) is not None
    limit = opts.get("--time", opts.get("-t"))
    seconds = None
    try:
        seconds = None if limit is None else slurm_seconds(limit)
    except ValueError as exc:
        out.append(Check("fail", "time", f"{path}: {exc}", "write #SBATCH --time in one of those forms"))
    signal = opts.get("--signal")
    if signal is None:
        out.append(Check("fail", "signal", f"{path} has no #SBATCH --signal: at the time limit the run is killed "
                                           "without saving last/",
                         "add `#SBATCH --signal=B:USR1@120` and a trap that forwards it (see slurm/train.sbatch)"))
    else:
        m = SIGNAL_RE.match(signal)
        if not m:
            out.append(Check("fail", "signal", f"--signal={signal} is not of the form [B:]SIG[@SECONDS]",
                             "write it as --signal=B:USR1@120"))
        elif traps and m["where"] != "B":
            out.append(Check("warn", "signal", f"--signal={signal} goes to the job steps, not to this script's trap",
                             f"use --signal=B:{m['sig']}@{m['sec'] or 60} so that the trap forwards it"))
        elif not traps and m["where"] == "B":
            out.append(Check("warn", "signal", f"--signal={signal} goes only to the batch shell, which has no trap: "
                                               "the training processes never see it",
                             "add a trap that forwards the signal, or drop B: to signal the job steps"))
        else:
            out.append(Check("ok", "signal", f"--signal={signal}" + (" (trapped by the script)" if traps else "")))
        if m and seconds is not None and m["sec"] and seconds <= int(m["sec"]):
            out.append(Check("fail", "signal", f"--time {limit} is not longer than the "
                                               f"signal lead of {m['sec']} s: the signal comes at the start",
                             "give more --time or a shorter @SECONDS"))
    if "--requeue" in opts:
        out.append(Check("ok", "requeue", "--requeue: the job can be requeued after preemption"))
    else:
        why = "--no-requeue forbids" if "--no-requeue" in opts else "without --requeue, clusters with JobRequeue=0 refuse"
        out.append(Check("fail", "requeue", f"{path}: {why} `scontrol requeue`; a preempted run does not come back",
                         "add `#SBATCH --requeue`"))
    if "--requeue" in opts and opts.get("--open-mode") != "append":
        out.append(Check("warn", "log", "a requeued job truncates its log (no --open-mode=append)",
                         "add `#SBATCH --open-mode=append`"))
    output = opts.get("--output", opts.get("-o"))
    if output and "/" in output:
        folder = Path(output).parent
        if "%" not in str(folder) and not folder.is_dir():
            out.append(Check("warn", "log", f"log folder {folder}/ does not exist here: Slurm does not create it and "
                                            "the job fails without a log",
                             f"mkdir -p {folder} in the folder you submit from"))
        else:
            out.append(Check("ok", "log", f"logs go to {output}"))
    return out
