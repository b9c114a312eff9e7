"""seg.dist: torchrun environment, Slurm array tasks, prediction worker index."""

import pytest

from seg.dist import ArrayTask, DistEnv, prediction_worker, read_array_task, read_dist_env

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


def test_no_environment_is_one_process():
    assert read_dist_env({}) == DistEnv(0, 1, 0) and not read_dist_env({}).is_distributed


def test_full_environment():
    env = read_dist_env(TORCHRUN)
    assert env == DistEnv(1, 2, 1) and env.is_distributed and not env.is_main


def test_partial_environment_raises():
    with pytest.raises(RuntimeError, match="Partially set distributed environment: RANK set but WORLD_SIZE, LOCAL_RANK missing"):
        read_dist_env({"RANK": "0"})
    with pytest.raises(RuntimeError, match="RANK=2 is outside WORLD_SIZE=2"):
        read_dist_env({**TORCHRUN, "RANK": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        read_dist_env({**TORCHRUN, "WORLD_SIZE": "two"})


def test_array_task_from_count_and_from_min_max():
    assert read_array_task({}) == ArrayTask(0, 1)
    assert read_array_task({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == ArrayTask(2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8",
           "SLURM_ARRAY_TASK_COUNT": "4"}
    assert read_array_task(env) == ArrayTask(2, 4)
    with pytest.raises(RuntimeError, match="without SLURM_ARRAY_TASK_COUNT"):
        read_array_task({"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(RuntimeError, match="outside the array"):
        read_array_task({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_prediction_worker_combines_array_and_ranks():
    env = {**TORCHRUN, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert prediction_worker(env=env) == (2 * 2 + 1, 4 * 2)
    assert prediction_worker(env={}) == (0, 1)
    assert prediction_worker(part=1, num_parts=3, env=env) == (1 * 2 + 1, 3 * 2)  # explicit part wins
    workers = {prediction_worker(env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                      "SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3"})
               for r in range(2) for t in range(3)}
    assert workers == {(w, 6) for w in range(6)}  # every worker index once
    with pytest.raises(ValueError, match="--part 3 --num_parts 3"):
        prediction_worker(part=3, num_parts=3, env={})
    with pytest.raises(ValueError, match="--part 1 --num_parts None"):
        prediction_worker(part=1, env={})
