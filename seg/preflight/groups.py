"""Doctor check: no group (patient, slide, volume) has samples in both train and val.

Neighbouring slices of a volume, or several images of one patient, are near-duplicates: when
they straddle the split, validation scores memorised data. ``seg prepare`` splits by group
(``--group_by``, and always by volume for NIfTI data) and lists each split's groups in
``dataset.json``; this check reads that list. Given ``--group_by REGEX`` it instead reads every
sample's JSON in the shards (the relative path of its image), so a folder prepared without
grouping can be checked for leaks by patient after the fact.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from seg.preflight import Check

SPLITS = ("train", "val")
SHOWN = 5


def shard_groups(data_dir: str | Path, info: dict, pattern: "re.Pattern") -> tuple[dict[str, set], int]:
    """({split: groups of its samples}, samples whose path the pattern does not match)."""
    from seg.data.pairing import group_of

    found: dict[str, set] = {s: set() for s in SPLITS}
    unmatched = 0
    for split in SPLITS:
        for shard in info.get("splits", {}).get(split, {}).get("shards", []):
            with tarfile.open(Path(data_dir) / shard["name"]) as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    meta = json.load(tar.extractfile(member))
                    group = group_of(meta.get("image") or member.name[:-5], pattern)
                    if group is None:
                        unmatched += 1
                    else:
                        found[split].add(group)
    return found, unmatched


def _leak(found: dict[str, set], how: str, fix: str) -> Check:
    both = sorted(found["train"] & found["val"])
    if both:
        shown = ", ".join(both[:SHOWN]) + (f" ... and {len(both) - SHOWN} more" if len(both) > SHOWN else "")
        return Check("fail", "groups", f"{len(both)} group(s) ({how}) have samples in both train and val: {shown}; "
                                       "validation scores data the model was trained on", fix)
    return Check("ok", "groups", f"{len(found['train'])} train / {len(found['val'])} val groups ({how}), "
                                 "none in both splits")


def check_groups(data_dir: str | Path, group_by: str | None = None) -> list[Check]:
    """The split leak check (see the module docstring).

    Args:
        data_dir: folder written by ``seg prepare``.
        group_by: regex giving a sample's group from its image's relative path; None uses the
            groups recorded in dataset.json.
    """
    from seg.data.shards import load_dataset_info

    try:
        info = load_dataset_info(data_dir)
    except (ValueError, FileNotFoundError):
        return []  # the data check reports it
    reprepare = (f"re-run `seg prepare ... --out {data_dir} --overwrite --group_by REGEX` so that each group "
                 "goes whole into one split")
    if group_by:
        try:
            pattern = re.compile(group_by)
        except re.error as exc:
            return [Check("fail", "groups", f"--group_by {group_by!r} is not a valid regular expression ({exc})",
                          "fix the pattern")]
        try:
            found, unmatched = shard_groups(data_dir, info, pattern)
        except (OSError, tarfile.TarError, ValueError) as exc:
            return [Check("fail", "groups", f"cannot read the samples of {data_dir}: {exc}",
                          "re-run `seg prepare` (a shard is damaged)")]
        out = [_leak(found, f"by {group_by!r}", reprepare.replace("REGEX", repr(group_by)))]
        if unmatched:
            out.append(Check("warn", "groups", f"{unmatched} sample(s) have a path --group_by {group_by!r} does not "
                                               "match; they were not checked", "fix the pattern"))
        return out
    groups = info.get("groups")
    if not groups:
        return [Check("ok", "groups", "split by sample (prepared without --group_by); pass --group_by REGEX to "
                                      "check that no patient or slide is in both splits")]
    how = f"by {groups['group_by']!r}" if groups.get("group_by") else (
        "by volume" if info.get("kind") == "volumes" else "by sample")
    return [_leak({s: set(groups.get(s, [])) for s in SPLITS}, how, reprepare)]
