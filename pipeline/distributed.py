"""Process setup shared by every stage: launcher environment or one plain process, accelerator, threads.

Under `deepspeed` (or torchrun) the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT and,
on DeepSpeed's launcher, LOCAL_SIZE (ranks on this node). In a plain `python -m pipeline.<stage>`
process none is set, and `setup()` fills a one-rank world so the same code path runs everywhere.
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    accelerator: str  # "cuda" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_accelerator() -> str:
    """DS_ACCELERATOR wins; otherwise CUDA when torch sees a GPU, else CPU."""
    import torch

    name = os.environ.get("DS_ACCELERATOR")
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def threads_per_rank(local_size: int, cpus: int | None = None) -> int:
    """CPU threads for one rank: the node's cores shared by its ranks (2 ranks on 2 cores -> 1 each).
    Oversubscribing (each rank taking every core) measured ~6% slower with a 2 s first step."""
    cpus = cpus or len(os.sched_getaffinity(0))
    return max(1, cpus // max(1, local_size))


def setup() -> Dist:
    """Fill a one-rank world when no launcher did, pick the accelerator, size threads, start the
    process group (gloo on CPU, nccl on CUDA, as DeepSpeed's accelerator chooses)."""
    import torch

    if "RANK" not in os.environ:  # plain `python -m pipeline.<stage>`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = detect_accelerator()
    os.environ["DS_ACCELERATOR"] = accelerator  # DeepSpeed reads it on import of its accelerator
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE; DeepSpeed's launcher LOCAL_SIZE.
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if accelerator == "cpu":
        n = int(os.environ.get("OMP_NUM_THREADS", "0")) or threads_per_rank(local_size)
        torch.set_num_threads(n)
    else:
        torch.cuda.set_device(local_rank)

    import deepspeed
    from deepspeed.utils import logger

    # DeepSpeed logs every config value at INFO on every rank; the stage prints what matters.
    # DS_LOG_LEVEL=info brings it back for debugging.
    logger.setLevel(os.environ.get("DS_LOG_LEVEL", "warning").upper())
    # torch 2.13 deprecates the collective names DeepSpeed 0.19 still calls, once per call site and rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    deepspeed.init_distributed(verbose=False)
    release_shm_buffer(rank)
    return Dist(rank, world, local_rank, local_size, accelerator)


def shm_buffer_path(rank: int) -> str:
    """The 69 MB shared-memory file DeepSpeed's CPU comm op makes per rank when all ranks share a node."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer(rank: int) -> None:
    """DeepSpeed never unlinks its shm buffers, so every run left 138 MB (2 ranks) of RAM-backed
    /dev/shm behind until the machine ran out of memory. Once every rank has mapped every buffer
    (init_distributed returns only after that, hence the barrier), each rank unlinks its own name:
    the mappings stay valid and the memory is freed when the last rank exits, even on kill -9."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(shm_buffer_path(rank))
    except (FileNotFoundError, PermissionError):
        pass


def teardown(success: bool = True) -> None:
    """Destroy the process group: without it rank 0 sometimes aborts at exit with
    'terminate called without an active exception' (exit 250) after a good run.
    After a failure there is no barrier: the other ranks may never reach it."""
    import torch.distributed as dist

    if dist.is_initialized():
        if success:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: list[float]) -> list[float]:
    """Average floats over ranks (one collective for the whole list)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()
