"""``python -m seg``: the same as the `seg` command."""

from seg.cli import console_main

console_main()
