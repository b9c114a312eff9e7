"""Shared test settings.

Tests run on a 2-core CPU alongside each other: torch is limited to one thread per test
process so that multi-process tests (torchrun, accelerate launch, Slurm) do not oversubscribe.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
