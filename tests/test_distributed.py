"""pipeline/distributed.py: DeepSpeed's collectives through shared memory between the ranks of one CPU node."""
import json
import os
import subprocess

import pytest

from pipeline.distributed import SharedMemoryCollectives
from tests.conftest import REPO, free_port

FLOATS = ("bfloat16", "float32", "float16")


def test_shared_memory_collectives_give_gloos_results_and_leave_the_rest_to_gloo(tmp_path):
    port = free_port()
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "tests/collectives_check.py"],
                       cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                      "COLLECTIVES_CHECK_OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reports = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert all(rep["installed"] for rep in reports.values())
    for rank, rep in reports.items():
        wrong = {k: c for k, c in rep["cases"].items() if not c["equal"]}
        assert not wrong, f"rank {rank}: {wrong}"
    cases = reports[0]["cases"]
    for dt in FLOATS:  # taken: SUM on the whole world, contiguous, the op's dtypes
        for name in ("all_reduce_sum", "all_reduce_async", "all_gather", "all_gather_own_slot", "reduce_scatter",
                     "reduce_scatter_in_pieces"):
            assert cases[f"{name}_{dt}"]["shm"], f"{name}_{dt}"
    for dt in (*FLOATS, "float64", "uint8"):  # left to gloo: another op, another dtype, a layout, a group
        assert not cases[f"all_reduce_max_{dt}"]["shm"]
    for name in ("all_reduce_sum_float64", "all_gather_uint8", "reduce_scatter_float64",
                 "all_reduce_non_contiguous", "all_reduce_group_of_one"):
        assert not cases[name]["shm"], name


@pytest.mark.parametrize("env, rank, world, local_size", [
    ({"PIPELINE_SHM_COLLECTIVES": "0"}, 0, 2, 2),  # turned off
    ({}, 0, 1, 1),                                  # one process: nothing to exchange
    ({}, 0, 4, 2),                                  # ranks on other nodes: the op covers one node only
    ({}, 0, 64, 64),                                # more ranks than cores: the op would spin on shared cores
])
def test_shared_memory_collectives_stay_off_where_they_cannot_help(monkeypatch, env, rank, world, local_size):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(SharedMemoryCollectives, "installed", None)
    assert SharedMemoryCollectives.install(rank, world, local_size) is False
    assert SharedMemoryCollectives.installed is None
