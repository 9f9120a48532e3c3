"""torchrun's environment read and checked without starting anything: a launch whose size is
not T x P is one line and exit 2 on every rank, and ranks share memory only on one host."""
from __future__ import annotations

import pytest

from turbollm.config import EngineConfig
from turbollm.distributed.shm_allreduce import shm_supported
from turbollm.executor.torchrun_rank import check_world, launch_env, use_shared_memory
from turbollm.serve import main

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_launch_env_reads_torchrun_and_names_what_is_missing():
    env = launch_env(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 0, 1)
    assert not env.one_host
    with pytest.raises(ValueError, match="not started by torchrun: MASTER_PORT"):
        launch_env({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"})


def test_world_size_must_be_tp_times_pp():
    env = launch_env({**TORCHRUN, "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="torchrun started 4 ranks but .* = 2"):
        check_world(EngineConfig.from_kwargs(model="m", tensor_parallel_size=2), env)
    check_world(EngineConfig.from_kwargs(model="m", tensor_parallel_size=2,
                                         pipeline_parallel_size=2), env)


def test_shared_memory_only_when_every_rank_is_on_this_host():
    cfg = EngineConfig.from_kwargs(model="m", tensor_parallel_size=2)
    assert not use_shared_memory(cfg, launch_env(TORCHRUN), "cpu")  # two hosts: gloo
    one_host = launch_env({**TORCHRUN, "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert use_shared_memory(cfg, one_host, "cpu") == shm_supported()
    gloo = EngineConfig.from_kwargs(model="m", tensor_parallel_size=2, parallel_comm="gloo")
    assert not use_shared_memory(gloo, one_host, "cpu")
    shm = EngineConfig.from_kwargs(model="m", tensor_parallel_size=2, parallel_comm="shm")
    with pytest.raises(ValueError, match="needs every rank on one x86 Linux host"):
        use_shared_memory(shm, launch_env(TORCHRUN), "cpu")


def test_serve_refuses_a_mismatched_launch_in_one_line(monkeypatch, capsys, tiny_llama):
    for k, v in {**TORCHRUN, "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(k, v)
    assert main(["--model", str(tiny_llama), "-tp", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["turbollm.serve (rank 1): error: torchrun started 3 ranks but "
                   "--tensor-parallel-size 2 x --pipeline-parallel-size 1 = 2: they must be "
                   "equal"]
