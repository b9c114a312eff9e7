"""Slurm time limits (``--time``) read the way Slurm reads them, for the launchers and `seg doctor`.

Slurm accepts six forms: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` and
``D-HH:MM:SS`` (``sbatch --time``). A count of one field is not bounded by the next unit
(``90`` and ``90:00`` are both 90 minutes), as in Slurm. Slurm rounds a limit with seconds up
to whole minutes; :func:`slurm_minutes` does the same, which is what submitit's ``timeout_min``
takes. ``UNLIMITED``/``INFINITE`` are refused: a launcher needs a number to place its
save-and-requeue signal before the end.

Imports nothing beyond the standard library: ``launch/submit.py`` and ``seg doctor`` read it
without torch.
"""

from __future__ import annotations

import re

FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
"""The accepted forms, as error messages and help texts name them."""

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                      r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def slurm_seconds(text: str) -> int:
    """The time limit ``text`` in seconds.

    Args:
        text: a Slurm time limit in one of :data:`FORMS` (e.g. ``90``, ``24:00:00``, ``2-12``).

    Raises:
        ValueError: ``text`` is in none of the forms; the message names it and the forms.
    """
    m = _TIME_RE.match(str(text).strip())
    if m is None:
        raise ValueError(f"time limit {text!r} is not a Slurm time: use {FORMS} "
                         "(e.g. 90 for 90 minutes, 24:00:00, 2-00:00:00)")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "days" in g:
        return g["days"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    if "c" in g:  # HH:MM:SS
        return g["a"] * 3600 + g["b"] * 60 + g["c"]
    return g["a"] * 60 + g.get("b", 0)  # MM or MM:SS


def slurm_minutes(text: str) -> int:
    """The time limit ``text`` in whole minutes, seconds rounded up as Slurm does.

    Args:
        text: a Slurm time limit in one of :data:`FORMS`.

    Raises:
        ValueError: as :func:`slurm_seconds`.
    """
    return -(-slurm_seconds(text) // 60)
