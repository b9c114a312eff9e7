"""The one module that reads the launcher's environment (torchrun ranks, Slurm array tasks).

torchrun, ``accelerate launch``, srun-wrapped launchers and submitit all produce the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a half-set environment
is an error rather than a silent single-process run. Slurm job arrays add
SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT (or MIN/MAX), which prediction uses to split a
cohort: worker = array_task * world_size + rank, of array_tasks * world_size workers.
Nothing else in ``seg`` reads these variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, env) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def read_dist_env(env=None) -> DistEnv:
    """Ranks from the torchrun environment; single process when none of it is set."""
    env = os.environ if env is None else env
    present = [v for v in TORCHRUN_VARS if v in env]
    if not present:
        return DistEnv()
    if len(present) != len(TORCHRUN_VARS):
        missing = [v for v in TORCHRUN_VARS if v not in env]
        raise RuntimeError(
            f"Partially set distributed environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing. Start the job with torchrun or accelerate launch, or unset these variables."
        )
    rank, world, local = (_int_env(v, env) for v in TORCHRUN_VARS)
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


@dataclass(frozen=True)
class ArrayTask:
    index: int = 0
    count: int = 1


def read_array_task(env=None) -> ArrayTask:
    """This process's Slurm array task (index from 0) and the number of tasks; (0, 1) outside arrays."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return ArrayTask()
    task = _int_env("SLURM_ARRAY_TASK_ID", env)
    if "SLURM_ARRAY_TASK_MIN" in env and "SLURM_ARRAY_TASK_MAX" in env:
        lo, hi = _int_env("SLURM_ARRAY_TASK_MIN", env), _int_env("SLURM_ARRAY_TASK_MAX", env)
        count = hi - lo + 1
        index = task - lo
    elif "SLURM_ARRAY_TASK_COUNT" in env:
        count, index = _int_env("SLURM_ARRAY_TASK_COUNT", env), task
    else:
        raise RuntimeError("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or MIN/MAX")
    if not 0 <= index < count:
        raise RuntimeError(f"array task {task} is outside the array's {count} tasks (ids need to be contiguous)")
    return ArrayTask(index=index, count=count)


def prediction_worker(part: int | None = None, num_parts: int | None = None, env=None) -> tuple[int, int]:
    """(worker index, number of workers) for cohort prediction.

    Explicit ``--part k --num_parts n`` wins over the array; within a part, torchrun ranks split
    further: worker = part * world_size + rank.
    """
    dist = read_dist_env(env)
    if part is not None or num_parts is not None:
        if part is None or num_parts is None or not 0 <= part < num_parts:
            raise ValueError(f"--part {part} --num_parts {num_parts} is not valid; need 0 <= part < num_parts")
        task = ArrayTask(part, num_parts)
    else:
        task = read_array_task(env)
    return task.index * dist.world_size + dist.rank, task.count * dist.world_size
