"""The `seg` command and `python -m seg.<module>` entry points.

Subcommand modules are written by different people at different times; the per-module tests
are parametrised over the modules of ``seg.cli.SUBCOMMANDS`` that exist
(``importlib.util.find_spec``), and ``test_core_subcommands_exist`` pins the ones that must.
"""

import importlib.util
import subprocess
import sys

import pytest

from seg import __version__
from seg.cli import SUBCOMMANDS, main, usage

EXISTING = [name for name, (module, _) in SUBCOMMANDS.items() if importlib.util.find_spec(module) is not None]


def test_core_subcommands_exist():
    assert {"prepare", "demo-data"} <= set(EXISTING)


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == usage()
    for name, (_, text) in SUBCOMMANDS.items():
        assert f"  {name}" in out and text in out


def test_unknown_command_lists_valid_ones(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and ", ".join(SUBCOMMANDS) in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"seg {__version__}"


@pytest.mark.parametrize("name", EXISTING)
def test_subcommand_help_in_process(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "seg", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in SUBCOMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXISTING)
def test_python_dash_m_module_help(name):
    module = SUBCOMMANDS[name][0]
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


EXIT_WITH_WORKERS = """
import sys, time, torch
from torch.utils.data import DataLoader, IterableDataset
from seg.cli import exit_now
from seg.training.loaders import ignore_preemption_signals

class Endless(IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield torch.zeros(2)

batches = iter(DataLoader(Endless(), batch_size=2, num_workers=2, worker_init_fn=ignore_preemption_signals))
next(batches)  # two workers running, the DataLoader's SIGCHLD handler installed
print("workers up", flush=True)
exit_now(3)
"""


@pytest.mark.timeout(120)
def test_exit_now_ends_a_process_whose_dataloader_workers_run():
    """Killing the workers fires the DataLoader's SIGCHLD handler ("worker ... is killed by
    signal"); it must not abort the exit into the interpreter's teardown (which once hung CI)."""
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_WORKERS], capture_output=True, text=True, timeout=90)
    assert "workers up" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-2000:]
