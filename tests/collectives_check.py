"""Run by tests/test_distributed.py under `deepspeed --num_gpus 2`: every collective that SharedMemoryCollectives
takes gives gloo's result, bit for bit, and what it does not take goes to gloo. Each rank writes its verdicts to
$COLLECTIVES_CHECK_OUT/rankN.json."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.distributed import SharedMemoryCollectives, setup, teardown  # noqa: E402

dist_info = setup()
import deepspeed.comm as dist  # noqa: E402
from deepspeed.comm import ReduceOp  # noqa: E402

shm = SharedMemoryCollectives.installed
rank = dist_info.rank
used = []
real_op = shm.op
shm.op = lambda t: (used.append(t.numel()), real_op(t))[1]
g = torch.Generator().manual_seed(rank)
report = {"installed": shm is not None, "cases": {}}


def compare(name, fn):
    """fn() through the routing and through gloo alone: equal? and did the routing take it?"""
    used.clear()
    shm.active = True
    a = fn()
    took = bool(used)
    shm.active = False
    b = fn()
    shm.active = True
    report["cases"][name] = {"equal": bool(torch.equal(a, b)), "shm": took}


def all_reduce(x, **kw):
    y = x.clone()
    handle = dist.all_reduce(y, **kw)
    if handle is not None:
        handle.wait()
    return y


for dt in (torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.uint8):
    x = (torch.randn(1000, generator=g) * 100).to(dt)
    name = str(dt).removeprefix("torch.")
    compare(f"all_reduce_sum_{name}", lambda x=x: all_reduce(x, op=ReduceOp.SUM))
    compare(f"all_reduce_max_{name}", lambda x=x: all_reduce(x, op=ReduceOp.MAX))
    compare(f"all_reduce_async_{name}", lambda x=x: all_reduce(x, async_op=True))

    def gather(x=x):
        out = torch.empty(2000, dtype=x.dtype)
        dist.all_gather_into_tensor(out, x)
        return out

    def gather_into_own_slot(x=x):  # as ZeRO-1/2 call it: the input is this rank's slot of the output
        out = torch.cat([x, x]) + rank
        dist.all_gather_into_tensor(out, out[rank * 1000:(rank + 1) * 1000])
        return out

    def scatter(x=x):
        out = torch.empty(500, dtype=x.dtype)
        source = x.clone()
        dist.reduce_scatter_tensor(out, source)
        assert torch.equal(source, x), "reduce_scatter_tensor changed its input"
        return out

    compare(f"all_gather_{name}", gather)
    compare(f"all_gather_own_slot_{name}", gather_into_own_slot)
    compare(f"reduce_scatter_{name}", scatter)
    SharedMemoryCollectives.SCRATCH_ELEMENTS = 300  # pieces that straddle this rank's slice and end short
    compare(f"reduce_scatter_in_pieces_{name}", scatter)
    SharedMemoryCollectives.SCRATCH_ELEMENTS = 1 << 22

def empty_scatter():
    out = torch.empty(0)
    dist.reduce_scatter_tensor(out, torch.empty(0))
    return out


compare("reduce_scatter_empty", empty_scatter)
strided = torch.randn(20, 30, generator=g).t()
compare("all_reduce_non_contiguous", lambda: all_reduce(strided))
one = dist.new_group([0])
if rank == 0:
    compare("all_reduce_group_of_one", lambda: all_reduce(torch.ones(4), group=one))
dist.barrier()
with open(os.path.join(os.environ["COLLECTIVES_CHECK_OUT"], f"rank{rank}.json"), "w") as f:  # every rank's own verdicts (printed lines
    json.dump(report, f)                                              # of two ranks can interleave)
teardown()
