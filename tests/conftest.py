"""Shared fixtures: a prepared corpus (Python's own help topics, real English that ships with CPython),
the repository root, and a runner for stage commands under the real `deepspeed` launcher."""
import glob
import json
import os
import socket
import subprocess
import sys
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
