"""The `seg` console command: one subcommand per job, each also `python -m seg.<module>`.

Subcommand modules are imported lazily so that `seg --help` and the start-up of light
commands do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes main(argv: list[str] | None) -> int.
SUBCOMMANDS = {
    "prepare": ("seg.prepare", "pair images with masks, validate them, write WebDataset shards"),
    "train": ("seg.train", "train the U-Net on shards (single process, accelerate launch, torchrun)"),
    "predict": ("seg.predict", "predict masks for a folder, file list, shards or one image"),
    "evaluate": ("seg.evaluate", "score predictions or a model against ground truth; report and plots"),
    "report": ("seg.report", "one HTML page to review a predicted cohort (QC, worst cases, evaluation)"),
    "doctor": ("seg.doctor", "preflight checks for a training or prediction run"),
    "demo-data": ("seg.demo_data", "write a synthetic images/ + masks/ data set"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: seg <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `seg <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from seg import __version__

        print(f"seg {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"seg: unknown command {name!r}; valid commands are {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


def console_main() -> None:
    """The `seg` console script: like main(), but ends the process without the interpreter's
    module teardown (1-2 s after torch is loaded; see seg.train.exit_now)."""
    code = main()
    from seg.train import exit_now

    exit_now(code)


if __name__ == "__main__":
    console_main()
