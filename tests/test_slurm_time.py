"""seg/slurm_time.py: every Slurm --time form, rounding to minutes, and named errors."""

from __future__ import annotations

import pytest

from seg.slurm_time import FORMS, slurm_minutes, slurm_seconds


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60),                        # MM
    ("0", 0),
    ("30:15", 30 * 60 + 15),                # MM:SS
    ("90:00", 90 * 60),                     # minutes beyond an hour, as Slurm accepts
    ("24:00:00", 24 * 3600),                # HH:MM:SS
    ("1:02:03", 3600 + 2 * 60 + 3),
    ("2-12", 2 * 86400 + 12 * 3600),        # D-HH
    ("1-02:30", 86400 + 2 * 3600 + 30 * 60),  # D-HH:MM
    ("3-00:00:01", 3 * 86400 + 1),          # D-HH:MM:SS
    (" 10 ", 600),
])
def test_every_slurm_form(text, seconds):
    assert slurm_seconds(text) == seconds


@pytest.mark.parametrize("text, minutes", [("90", 90), ("0:01", 1), ("1:00:59", 61), ("0-00:00:00", 0),
                                           ("1-00", 1440), ("00:30:00", 30)])
def test_minutes_round_seconds_up_as_slurm(text, minutes):
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "x", "1:2:3:4", "-5", "1-", "1-2:3:4:5", "1.5", "1h", "UNLIMITED",
                                  "1-2-3", ":30", "30:", "1--2"])
def test_invalid_time_names_the_value_and_the_forms(text):
    with pytest.raises(ValueError) as err:
        slurm_seconds(text)
    assert repr(text) in str(err.value) and FORMS in str(err.value)
    with pytest.raises(ValueError):
        slurm_minutes(text)
