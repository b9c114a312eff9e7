"""The launch layer without Slurm: launch/torchrun.sh --cpu 2 and the accelerate CPU config run
a smoke training; launch/worker.py records exit codes; the sbatch scripts are valid bash and
carry the #SBATCH lines the preemption design depends on (golden test).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_helpers import RUN_FILES, history_epochs, smoke_train_args

from seg.preflight.slurm import check_sbatch, parse_sbatch_options

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/train.sbatch", "slurm/predict.sbatch", "slurm/summarize.sbatch", "slurm/common.sh",
           "launch/torchrun.sh", "tools/slurm_cluster.sh"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_train_sbatch_header_golden():
    opts = parse_sbatch_options((ROOT / "slurm" / "train.sbatch").read_text())
    assert opts == {
        "--job-name": "seg-train", "--nodes": "1", "--ntasks-per-node": "1", "--cpus-per-task": "8",
        "--time": "24:00:00", "--signal": "B:USR1@120", "--requeue": "", "--open-mode": "append",
        "--output": "logs/%x-%j.out",
    }
    assert [c for c in check_sbatch(str(ROOT / "slurm" / "train.sbatch")) if c.status == "fail"] == []


def test_predict_and_summarize_sbatch_headers():
    predict = parse_sbatch_options((ROOT / "slurm" / "predict.sbatch").read_text())
    assert predict["--output"] == "logs/%x-%A_%a.out" and "--requeue" in predict
    assert predict["--open-mode"] == "append" and predict["--ntasks"] == "1"
    summarize = parse_sbatch_options((ROOT / "slurm" / "summarize.sbatch").read_text())
    assert summarize["--output"] == "logs/%x-%j.out"
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    for needle in ('scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1', "--rdzv_endpoint",
                   'scontrol requeue "$SLURM_JOB_ID"', "trap 'forward USR1' USR1", "trap 'forward TERM' TERM"):
        assert needle in text


@pytest.mark.parametrize("args, code", [(["--print_config"], 0), (["train.epochs=0"], 2)])
def test_worker_records_exit_code(tmp_path, args, code):
    env = dict(_env(), SEG_EXIT_DIR=str(tmp_path / "exit"), RANK="3")
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "worker.py"), "seg.train", *args],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == code, out.stderr
    assert (tmp_path / "exit" / "rank-3").read_text().strip() == str(code)


def test_torchrun_sh_usage_errors_say_what_to_do():
    script = str(ROOT / "launch" / "torchrun.sh")
    out = subprocess.run(["bash", script, "--cpu"], capture_output=True, text=True)
    assert out.returncode == 2 and "--cpu needs a value" in out.stderr
    out = subprocess.run(["bash", script, "--cpu", "--config", "x.yaml"], capture_output=True, text=True)
    assert out.returncode == 2 and "--cpu needs a value" in out.stderr
    out = subprocess.run(["bash", script, "--cpu", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "positive integer" in out.stderr
    out = subprocess.run(["bash", script, "--nnodes", "2", "--cpu", "1"], capture_output=True, text=True)
    assert out.returncode == 2 and "needs --rdzv_endpoint" in out.stderr
    if shutil.which("nvidia-smi") is None:
        out = subprocess.run(["bash", script, "--config", "x.yaml"], capture_output=True, text=True, env=_env())
        assert out.returncode == 2 and "use --cpu N" in out.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_sh_cpu_two_processes(smoke_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--cpu", "2",
                          *smoke_train_args(smoke_shards, run_dir)],
                         env=_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "seg train: 2 process(es)" in out.stdout + out.stderr
    assert not [n for n in RUN_FILES if not (run_dir / n).exists()]
    assert history_epochs(run_dir) == [1, 2]


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_torchrun_sh_saves_on_every_rank(smoke_shards, tmp_path):
    """The launcher forwards SIGTERM; both workers save last/ and exit 75 (recorded by worker.py)."""
    run_dir = tmp_path / "run"
    env = dict(_env(), SEG_EXIT_DIR=str(tmp_path / "exit"))
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), "--cpu", "2",
                             *smoke_train_args(smoke_shards, run_dir, "train.epochs=40")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(history_epochs(run_dir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)  # torchrun.sh execs torchrun: this is the launcher
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    progress = json.loads((run_dir / "last" / "progress.json").read_text())
    assert progress["preempted"] is True and progress["finished"] is False
    codes = sorted(p.read_text().strip() for p in (tmp_path / "exit").glob("rank-*"))
    assert codes == ["75", "75"]
    assert len(history_epochs(run_dir)) < 40


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_cpu_config_two_processes(smoke_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / "cpu.yaml"), "-m", "seg.train", *smoke_train_args(smoke_shards, run_dir)]
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "seg train: 2 process(es)" in out.stdout + out.stderr
    assert not [n for n in RUN_FILES if not (run_dir / n).exists()]
    assert history_epochs(run_dir) == [1, 2]


@pytest.mark.parametrize("name", ["one_node_multi_gpu.yaml", "multi_node.yaml", "cpu.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch" / "accelerate" / name))
    assert cfg.distributed_type.value == "MULTI_GPU"
    assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0


def test_submit_py_validates_before_submitting(tmp_path):
    submit = [sys.executable, str(ROOT / "launch" / "submit.py")]
    out = subprocess.run([*submit, "train", "--log_dir", str(tmp_path / "%j"), "--config",
                          str(ROOT / "configs" / "cpu-smoke.yaml"), "train.epochs=0"], capture_output=True, text=True)
    assert out.returncode == 2 and "train.epochs=0 is not valid" in out.stderr
    assert not list(tmp_path.iterdir()), "nothing may be submitted for an invalid config"
    out = subprocess.run([*submit, "predict", "--parts", "2", "--model_path", "m.pth"], capture_output=True, text=True)
    assert out.returncode == 2 and "--output_dir is required" in out.stderr
    out = subprocess.run([*submit, "fly"], capture_output=True, text=True)
    assert out.returncode == 2 and "launch/submit.py train" in out.stdout


def test_hpc_doc_commands_refer_to_existing_files_and_flags():
    """The commands of README.md and docs/HPC.md: every script they name exists, every `seg doctor`
    and `launch/submit.py` flag they use is accepted."""
    import re
    import shlex

    from seg.doctor import build_parser

    text = "\n".join((ROOT / doc).read_text() for doc in ("README.md", "docs/HPC.md"))
    for path in set(re.findall(r"\b((?:slurm|launch|tools|configs)/[\w./-]+\.(?:sbatch|sh|py|yaml))", text)):
        if "<" not in path:
            assert (ROOT / path).is_file(), f"README.md or docs/HPC.md names {path}, which does not exist"
    commands = re.findall(r"^(seg doctor .*?|python launch/submit.py .*?)(?<!\\)$", text.replace("\\\n", " "),
                          flags=re.MULTILINE)
    assert commands
    for command in commands:
        words = [w for w in shlex.split(command.replace('"$(hostname -s)"', "h")) if w != "\\"]
        if words[0] == "seg":
            build_parser().parse_args(words[2:])
        else:
            spec = importlib.util.spec_from_file_location("submit_doc", ROOT / "launch" / "submit.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            parser = module.slurm_parser("submit.py")
            if words[2] == "predict":
                parser.add_argument("--parts", type=int, required=True)
                parser.add_argument("--parallel", type=int)
                parser.add_argument("--summarize", action="store_true")
            opts, rest = parser.parse_known_args(words[3:])
            assert all(not w.startswith("--") or w in KNOWN_PASSTHROUGH for w in rest), rest


KNOWN_PASSTHROUGH = {"--config", "--data_dir", "--checkpoint_dir", "--model_path", "--image_dir", "--output_dir"}
