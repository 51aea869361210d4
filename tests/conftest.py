"""Shared fixtures: a prepared corpus (Python's own help topics, real English that ships with CPython),
the repository root, and a runner for stage commands under the real `deepspeed` launcher."""
import glob
import json
import os
import runpy
import socket
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def help_topics_jsonl(path, paragraphs_per_doc=6):
    """Python's help topics as documents of a few paragraphs each (~460 documents, ~450 KB)."""
    import pydoc_data.topics

    with open(path, "w", encoding="utf-8") as f:
        for topic, text in sorted(pydoc_data.topics.topics.items()):
            paras = text.split("\n\n")
            for i in range(0, len(paras), paragraphs_per_doc):
                f.write(json.dumps({"text": "\n\n".join(paras[i:i + paragraphs_per_doc]), "topic": topic}) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared data folder (vocab 1000) shared by the training tests."""
    from pipeline import prepare

    root = tmp_path_factory.mktemp("corpus")
    corpus = help_topics_jsonl(root / "corpus.jsonl")
    out = root / "data"
    prepare.main(["--input", str(corpus), "--output", str(out), "--vocab-size", "1000",
                  "--valid-fraction", "0.05", "--test-fraction", "0.05"])
    return str(out)


def run_stage(script: str, args: list[str], ranks: int = 2, timeout: int = 900, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS pipeline/SCRIPT ARGS` (ranks=0: one plain `python -m` process)."""
    if ranks == 0:
        cmd = [sys.executable, "-m", "pipeline." + script.removesuffix(".py"), *args]
    else:
        port = free_port()
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port),
               os.path.join("pipeline", script), *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    r = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if ranks:
        leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        for path in leaked:
            os.unlink(path)
        assert not leaked, f"the run left DeepSpeed's shared-memory buffers behind: {leaked}"
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n"
                             f"--- stderr\n{r.stderr[-6000:]}")
    return r


def run_as_main(target: str, argv: list[str], monkeypatch) -> int:
    """Run a module (`pipeline.x`) or a script (`tools/x.py`) as `__main__` in this process with these arguments; its
    exit status. For what fails or finishes before any process group starts: no interpreter start, no imports."""
    monkeypatch.setattr(sys, "argv", [target, *argv])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules", it is re-executed
            if target.endswith(".py"):
                runpy.run_path(os.path.join(REPO, target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


FP32_STEPS = 12


def fp32_config(folder, name: str = "zero2.json") -> str:
    """A shipped ZeRO config in fp32 (this CPU emulates bf16 slowly; fault handling and ZeRO stage equivalence do
    not depend on precision) with a learning rate for a tiny model and a fixed 12-step schedule, so that a stopped
    run, a shorter one and the uninterrupted one follow the same LR."""
    ds = json.load(open(os.path.join(REPO, "ds_configs", name)))
    ds["bf16"] = {"enabled": False}
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["scheduler"]["params"].update(total_num_steps=FP32_STEPS, warmup_num_steps=2)
    path = folder / f"{name.removesuffix('.json')}_fp32.json"
    path.write_text(json.dumps(ds))
    return str(path)


def fp32_args(prepared: str, config: str, run, steps: int = FP32_STEPS) -> list[str]:
    """pretrain flags of the fp32 runs: a checkpoint every 3 steps, an evaluation every 4."""
    return ["--data", prepared, "--model", "tiny", "--deepspeed_config", config, "--output", str(run),
            "--train-steps", str(steps), "--seq-length", "32", "--log-interval", "1", "--eval-interval", "4",
            "--eval-batches", "1", "--save-interval", "3", "--keep-checkpoints", "2", "--seed", "5"]


@pytest.fixture(scope="session")
def fp32_zero2_run(prepared, tmp_path_factory):
    """An uninterrupted 12-step run of fp32_config("zero2.json") on 2 ranks: the loss curve that the fault tests'
    resumed runs and the other ZeRO stages (tests/test_pretrain.py) must reproduce."""
    root = tmp_path_factory.mktemp("fp32_zero2")
    run_stage("pretrain.py", fp32_args(prepared, fp32_config(root), root / "run"))
    return root / "run"


def scalars(run_dir, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar from a run's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# ---------------------------------------------------------------- a fake engine for unit tests of the shared loop

class FakeEngine:
    """What the loop uses of a DeepSpeedEngine; a checkpoint's client state is a JSON file in its folder."""

    device = torch.device("cpu")
    global_rank, world_size = 0, 1
    module = torch.nn.Linear(2, 2)

    def __init__(self):
        self.monitor = SimpleNamespace(enabled=False)
        self.steps = 0

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return False

    def zero_optimization_stage(self):
        return 0

    def gradient_accumulation_steps(self):
        return 1

    def backward(self, loss):
        pass

    def step(self):
        self.steps += 1

    def get_lr(self):
        return [0.1]

    def get_global_grad_norm(self):
        return 0.5

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag))
        with open(os.path.join(directory, tag, "client_state.json"), "w") as f:
            json.dump(client_state, f)

    def load_checkpoint(self, directory, tag):
        with open(os.path.join(directory, tag, "client_state.json")) as f:
            return os.path.join(directory, tag), json.load(f)
