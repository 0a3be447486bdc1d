"""`sapling.dist.launch_env`: the world as torchrun, submitit or Slurm describe it, and clear errors."""

from __future__ import annotations

import pytest

from sapling.dist import LaunchError, expand_hostlist, launch_env


@pytest.mark.parametrize("hostlist,expected", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-10]b,c", ["a8b", "a9b", "a10b", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n0",
           "MASTER_PORT": "29500", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    e = launch_env(env)  # torchrun under srun: torchrun's own variables win
    assert (e.source, e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.master_port) == (
        "torchrun", 5, 8, 1, 4, "n0", 29500)


def test_srun_tasks_head_node_and_port_from_the_job():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "6",
           "SLURM_NTASKS": "6", "SLURM_STEP_NODELIST": "node[07-09]", "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
           "SLURM_JOB_ID": "123456"}
    e = launch_env(env)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("slurm", 3, 6, 1, 2)
    assert e.master_addr == "node07" and e.master_port == 20000 + 123456 % 40000
    assert launch_env({**env, "MASTER_ADDR": "ib-node07", "MASTER_PORT": "1234"}).master_addr == "ib-node07"
    assert launch_env({**env, "SLURM_PROCID": "0"}).master_port == e.master_port  # every task derives the same


def test_batch_script_without_srun_is_one_process():
    e = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"})
    assert (e.source, e.world_size, e.master_port) == ("single", 1, None)
    assert launch_env({}).source == "single"


def test_submitit_local_tasks():
    env = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_EXECUTOR": "local"}
    e = launch_env(env)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr) == ("submitit-local", 1, 2, 1, "127.0.0.1")
    assert e.master_port == 20000 + 4242


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_PORT is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1"},
     "LOCAL_RANK=3 is outside LOCAL_WORLD_SIZE=2"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "n1"},
     "SLURM_PROCID=4 is outside SLURM_STEP_NUM_TASKS=4"),
    ({"SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NTASKS": "0"},
     "at least one process"),
])
def test_inconsistent_variables_fail_with_one_line(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_env(env)


def test_launch_error_reaches_the_user_as_one_line(cli_in_process, teacher_dir, corpus_file):
    # in this process (the variables are set for the run alone): the launch is refused before anything starts
    res = cli_in_process("distill", f"teacher.path={teacher_dir}", f"data.files=[{corpus_file}]", "deepspeed=zero2",
                         "logger=none", env={"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29999"})
    assert res.returncode == 1
    assert "RANK=3 is outside WORLD_SIZE=2" in res.stderr and "Traceback" not in res.stderr
