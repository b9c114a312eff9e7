"""`seg doctor`: each check finds the problem it is for, with a fix, and the exit code follows.

Real data (demo pairs prepared into shards), real scripts and real name resolution; nothing
is mocked.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import demo_shards

from seg.doctor import main
from seg.preflight import Check
from seg.preflight.checks import check_pairs, check_rendezvous, check_shards
from seg.preflight.slurm import check_sbatch, parse_sbatch_options

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 demo pairs in shards of 5 -> 2 train shards (and a val shard)."""
    return demo_shards(tmp_path_factory.mktemp("doctor"), n=12, size=32, shard_size=5)


def _by_name(checks: list[Check], name: str) -> list[Check]:
    return [c for c in checks if c.name == name]


def test_too_few_shards_for_ranks_times_workers(shards):
    n_train = len(list(shards.glob("train-*.tar")))
    assert _by_name(check_shards(str(shards), world_size=n_train, num_workers=1), "shards")[0].status == "ok"
    [fail] = _by_name(check_shards(str(shards), world_size=2, num_workers=2), "shards")
    assert fail.status == "fail" and "4 readers" in fail.message
    assert "--shard_size" in fail.fix and "num_workers" in fail.fix


def test_missing_data_dir_names_prepare(tmp_path):
    [fail] = check_shards(str(tmp_path / "nope"), 1, 0)
    assert fail.status == "fail" and "seg prepare" in fail.message


def test_unresolvable_head_node_fails_and_local_port_is_checked():
    [fail] = check_rendezvous("no-such-node.invalid", 29500, nodes=2)
    assert fail.status == "fail" and "does not resolve" in fail.message and "scontrol show hostnames" in fail.fix
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        checks = check_rendezvous("localhost", port, nodes=1)
    assert _by_name(checks, "rendezvous")[0].status == "ok"
    [port_check] = _by_name(checks, "port")
    assert port_check.status == "fail" and "in use" in port_check.message


def test_sbatch_without_signal_fails_and_train_sbatch_passes(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\nsrun seg train\n")
    checks = check_sbatch(str(script))
    [signal] = _by_name(checks, "signal")
    assert signal.status == "fail" and "--signal=B:USR1@120" in signal.fix
    assert _by_name(checks, "requeue")[0].status == "ok"
    good = check_sbatch(str(ROOT / "slurm" / "train.sbatch"))
    assert all(c.status == "ok" for c in good if c.name in ("signal", "requeue")), good


def test_sbatch_signal_form_requeue_time_and_log_folder(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --signal=USR1@300 --time=4\n#SBATCH -o nolog/%j.out\n"
                      "trap 'echo hi' USR1\nsrun true\n#SBATCH --requeue\n")
    checks = check_sbatch(str(script))
    statuses = {(c.name, c.status) for c in checks}
    assert ("signal", "warn") in statuses  # trapped but not B:
    assert ("signal", "fail") in statuses  # --time 4 min is not longer than 300 s
    assert ("requeue", "fail") in statuses  # the #SBATCH after the first command is ignored, as by Slurm
    assert any(c.name == "log" and c.status == "warn" and "mkdir -p nolog" in c.fix for c in checks)
    assert parse_sbatch_options("#SBATCH --nodes 2 -N 3\n")["--nodes"] == "2"


def test_sbatch_time_in_any_slurm_form_and_unreadable_time_fails(tmp_path):
    script = tmp_path / "job.sbatch"
    for limit, signal_ok in (("1-00", True), ("5:01", True), ("0:05:01", True), ("5", False), ("0-00:05", False)):
        script.write_text(f"#!/bin/bash\n#SBATCH --signal=B:USR1@300 --time={limit} --requeue\ntrap 'x' USR1\n")
        fails = [c for c in check_sbatch(str(script)) if c.status == "fail"]
        assert (fails == []) == signal_ok, (limit, fails)  # 300 s lead: needs more than 5 minutes
    script.write_text("#!/bin/bash\n#SBATCH --time=1:2:3:4 --requeue\n")
    [bad] = [c for c in check_sbatch(str(script)) if c.name == "time"]
    assert bad.status == "fail" and "'1:2:3:4'" in bad.message and "D-HH:MM:SS" in bad.message


def test_pairs_counts_missing_masks(tmp_path):
    from seg.data.synthetic import make_demo_dataset

    make_demo_dataset(tmp_path / "d", n=4, size=32)
    (tmp_path / "d" / "masks" / "0001_mask.png").unlink()
    checks = check_pairs(str(tmp_path / "d" / "images"), str(tmp_path / "d" / "masks"))
    assert checks[0].status == "ok" and "3 image/mask pair" in checks[0].message
    assert checks[1].status == "warn" and "1 missing mask" in checks[1].message


def test_prediction_outputs_and_tar_hint(shards, capsys):
    images = shards.parent / "raw" / "images"
    code = main(["--image_dir", str(images), "--output_dir", str(shards.parent / "out"), "--unit_size", "4",
                 "--num_parts", "2", "--save_overlay", "--tar_threshold", "10"])
    out = capsys.readouterr().out
    assert code == 0  # warnings only
    assert "12 image(s) in 3 unit(s)" in out and "24 output file(s) (mask, overlay)" in out
    assert "use --format tar: one tar per unit, 3 file(s)" in out


def test_cli_exit_code_and_report(shards, capsys):
    code = main(["--data_dir", str(shards), "--nproc_per_node", "2", "data.num_workers=2", "--head", "localhost",
                 "--port", "0"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  shards" in out and "fix:" in out and "1 failure(s)" in out
    bad = main(["--data_dir", str(shards), "train.epochs=0"])
    assert bad == 1 and "train.epochs=0" in capsys.readouterr().out


def test_python_m_seg_doctor_runs():
    out = subprocess.run([sys.executable, "-m", "seg.doctor", "--head", "localhost", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok    rendezvous" in out.stdout
