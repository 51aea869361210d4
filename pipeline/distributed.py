"""Process setup shared by every stage: launcher environment or one plain process, accelerator, threads.

Under `deepspeed` (or torchrun) the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT and,
on DeepSpeed's launcher, LOCAL_SIZE (ranks on this node). In a plain `python -m pipeline.<stage>`
process none is set, and `setup()` fills a one-rank world so the same code path runs everywhere.
"""
from __future__ import annotations

import ctypes
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


_one_process = False  # setup() filled a one-rank world in this process


def setup() -> Dist:
    """Fill a one-rank world when no launcher did, pick the accelerator, size threads, start the
    process group (gloo on CPU, nccl on CUDA, as DeepSpeed's accelerator chooses)."""
    import torch

    global _one_process
    # Started by deepspeed/torchrun, or a plain process (whose world this function filled, maybe earlier).
    launched = "RANK" in os.environ and not _one_process
    if not launched:  # plain `python -m pipeline.<stage>`: a world of one
        _one_process = True
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
    if accelerator == "cpu":
        SharedMemoryCollectives.install(rank, world, local_size)
    if launched:
        exit_with_launcher(rank)
    return Dist(rank, world, local_rank, local_size, accelerator)


def _process_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (R, S, Z for a zombie...), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def exit_with_launcher(rank: int, interval: float = 1.0) -> None:
    """A launcher killed with -9 cannot stop its ranks: they would train on, orphaned, writing into the
    run folder that the rerun of the command uses too. A daemon thread watches the process that started
    this rank (DeepSpeed's per-node `launch.py`, or torchrun) and, on DeepSpeed's single-node path, the
    `deepspeed` command above it; when one is gone (or a zombie) the rank exits at once, as a kill
    would: the rerun resumes from the last complete checkpoint. Linux only (/proc); elsewhere a no-op."""
    import threading
    import time

    if not os.path.isdir("/proc") or any(t.name == "exit-with-launcher" for t in threading.enumerate()):
        return
    parent = os.getppid()
    watched = [parent]
    grandparent = _parent_of(parent)
    if (grandparent and "deepspeed.launcher.launch" in _command_line(parent)
            and "deepspeed" in _command_line(grandparent)):
        watched.append(grandparent)

    def watch() -> None:
        while True:
            time.sleep(interval)
            gone = [pid for pid in watched if _process_state(pid) in (None, "Z", "X")]
            if gone or os.getppid() != parent:
                print(f"rank {rank}: the launcher (pid {gone[0] if gone else parent}) has gone; stopping this rank. "
                      "Rerun the same command to resume from the last complete checkpoint.", flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


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


class _Done:
    """The handle of a collective that has already finished (what an async_op caller waits on)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _overlaps(a, b) -> bool:
    """Whether two contiguous tensors share memory."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class SharedMemoryCollectives:
    """DeepSpeed's collectives between the ranks of one CPU node through shared memory instead of gloo.

    On a CPU, DeepSpeed communicates through torch.distributed's gloo backend, which sends every collective
    through TCP sockets, also between processes of one machine. DeepSpeed also JIT-builds a shared-memory
    all-reduce for CPU inference (`torch.ops.deepspeed.inference_all_reduce_`: each rank copies into its
    buffer in /dev/shm and sums the others' in place) and initializes it in every process whose ranks all
    share the node, but training never calls it. `install` routes DeepSpeed's training collectives to it:

        all_reduce (SUM)            the shared-memory all-reduce, in place
        all_gather_into_tensor      this rank's shard in its slot, zeros in the others, all-reduced (x + 0 is exact)
        reduce_scatter_tensor (SUM) the input all-reduced in pieces through a scratch buffer; this rank keeps its slice

    for contiguous fp32, bf16 and fp16 tensors on the group of all ranks (the op knows no other group);
    anything else (other ops, dtypes or groups) goes to gloo as before. Each rank adds the same numbers in
    fp32 and rounds once, so at 2 ranks the results equal gloo's bit for bit. Measured on the 2-core CPU,
    2 ranks, per call: a 2 MB bf16 all-reduce 1.0 ms against gloo's 3.2, an all-gather to 2 MB 1.1 ms
    against 2.0, a one-element all-reduce 0.03 ms against 0.22. The op spins while it waits for the
    other ranks, so it is used only when each rank of the node has a core of its own.
    PIPELINE_SHM_COLLECTIVES=0 keeps gloo for everything. `active` turns the routing off and on in a
    running process (tools/step_ab.py runs the HF Trainer's step on gloo, as the Trainer would).
    """

    installed: SharedMemoryCollectives | None = None
    SCRATCH_ELEMENTS = 1 << 22  # reduce_scatter_tensor sums its input in pieces of this many elements

    def __init__(self, backend, rank: int, world: int):
        import torch

        self.backend, self.rank, self.world, self.active = backend, rank, world, True
        self.gloo = {name: getattr(backend, name)
                     for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")}
        level = getattr(backend, "shm_vector_kernel_level", 0)  # the op's kernels this CPU can run
        self.dtypes = ({torch.float32} if level >= 1 else set()) | ({torch.bfloat16, torch.float16} if level >= 2 else set())
        self.op = torch.ops.deepspeed.inference_all_reduce_

    @classmethod
    def install(cls, rank: int, world: int, local_size: int) -> bool:
        """Route DeepSpeed's collectives through shared memory when all ranks are on this node; True if done."""
        import deepspeed.comm.comm as ds_comm

        backend = ds_comm.cdb
        if (os.environ.get("PIPELINE_SHM_COLLECTIVES", "1") == "0" or world < 2 or local_size != world
                or local_size > len(os.sched_getaffinity(0)) or getattr(backend, "shm_comm_op", None) is None):
            return False  # the op initializes itself only when LOCAL_SIZE == world size, as checked here
        if cls.installed is None:
            cls.installed = cls(backend, rank, world)
            backend.all_reduce = cls.installed.all_reduce
            backend.all_gather_into_tensor = cls.installed.all_gather_into_tensor
            backend.reduce_scatter_tensor = cls.installed.reduce_scatter_tensor
        return True

    def _takes(self, group, op, *tensors) -> bool:
        import torch
        import torch.distributed as dist

        if not self.active or any(t.dtype not in self.dtypes or not t.is_contiguous() for t in tensors):
            return False
        if op is not None and self.backend._reduce_op(op) != torch.distributed.ReduceOp.SUM:
            return False
        return group is None or (dist.get_world_size(group) == self.world and dist.get_rank(group) == self.rank)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        import torch

        op = torch.distributed.ReduceOp.SUM if op is None else op
        if not self._takes(group, op, tensor):
            return self.gloo["all_reduce"](tensor, op, group, async_op)
        self.op(tensor)
        return _Done() if async_op else None

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        if (not self._takes(group, None, output_tensor, input_tensor) or output_tensor.dtype != input_tensor.dtype
                or output_tensor.numel() != self.world * input_tensor.numel()):  # gloo says what is wrong
            return self.gloo["all_gather_into_tensor"](output_tensor=output_tensor, input_tensor=input_tensor,
                                                       group=group, async_op=async_op)
        n, out, shard = input_tensor.numel(), output_tensor.view(-1), input_tensor.view(-1)
        mine = out[self.rank * n:(self.rank + 1) * n]
        if shard.data_ptr() != mine.data_ptr():  # ZeRO passes its own slot of the output: nothing to copy
            mine.copy_(shard.clone() if _overlaps(shard, out) else shard)
        out[:self.rank * n].zero_()
        out[(self.rank + 1) * n:].zero_()
        self.op(out)
        return _Done() if async_op else None

    def reduce_scatter_tensor(self, output_tensor, input_tensor, op=None, group=None, async_op=False):
        import torch

        op = torch.distributed.ReduceOp.SUM if op is None else op
        if (not self._takes(group, op, output_tensor, input_tensor) or output_tensor.dtype != input_tensor.dtype
                or input_tensor.numel() != self.world * output_tensor.numel() or output_tensor.numel() == 0):
            return self.gloo["reduce_scatter_tensor"](output_tensor=output_tensor, input_tensor=input_tensor, op=op,
                                                      group=group, async_op=async_op)
        # The input stays as it was (as gloo leaves it): it is summed a piece at a time in a small scratch
        # buffer, not in a copy of all of it (ZeRO-3 reduces buckets of 5e7 elements).
        n, source, out = output_tensor.numel(), input_tensor.view(-1), output_tensor.view(-1)
        mine = (self.rank * n, (self.rank + 1) * n)
        step = min(source.numel(), self.SCRATCH_ELEMENTS)
        scratch = torch.empty(step, dtype=source.dtype)
        for start in range(0, source.numel(), step):
            piece = scratch[:min(step, source.numel() - start)]
            piece.copy_(source[start:start + piece.numel()])
            self.op(piece)
            lo, hi = max(start, mine[0]), min(start + piece.numel(), mine[1])  # this rank's part of the piece
            if lo < hi:
                out[lo - mine[0]:hi - mine[0]].copy_(piece[lo - start:hi - start])
        return _Done() if async_op else None


MMAP_THRESHOLD = 128 << 10  # bytes: blocks at least this large get their own mapping, unmapped when freed


def return_freed_memory_under_zero3(ds_config: dict) -> None:
    """Under ZeRO-3 on a CPU, have glibc give large freed blocks back to the system at once.

    ZeRO-3 gathers every layer's parameters before its forward and backward and frees them after, and
    reduces gradients through short-lived buckets. With glibc's default (a mapping threshold that grows to
    32 MB once such a block is freed) those blocks land in the heap, where the freed space stays resident:
    measured on llama-350m, 2 ranks, the resident set sat ~1.3 GB above the live tensors after the first
    step. With a fixed 128 KB threshold each such block is its own mapping, unmapped when freed, and the
    peak follows the live tensors. Stages 0-2 allocate their buffers once and keep them, and their steps
    slow down from the extra page faults, so they keep the default. A no-op on GPUs and off glibc."""
    from pipeline.config import zero_stage_of

    if zero_stage_of(ds_config) != 3 or detect_accelerator() != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixing it also stops glibc raising it)
        libc.mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: return free space at the top of the heap too
    except (OSError, AttributeError):
        pass  # not glibc: its allocator, its policy


def teardown(success: bool = True) -> None:
    """After a good run: barrier, then destroy the process group (without it rank 0 sometimes aborts
    at exit with 'terminate called without an active exception', exit 250). After a failure: nothing.
    The other ranks may never reach a barrier, and destroying the group would close the connections
    before Python prints this rank's traceback: the peers would report 'Connection reset by peer'
    first and bury the real error. The launcher stops the peers once this rank exits."""
    import torch.distributed as dist

    if success and dist.is_initialized():
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
