"""The shared loop (pipeline/training.py) on a fake engine: what a run reports (summary.json's train_loss,
grad_norm, tokens_per_sec) when it trains few steps, resumes, has nothing left to train, or stops early
between log steps. Unit tests: no process group, no DeepSpeed engine."""
import json
import os

import pytest
import torch

from pipeline.monitor import Monitor
from pipeline.training import LoopSettings, resume, train
from tests.conftest import FakeEngine


class CountingTask:
    """The loss of the n-th batch is 10 - n, so each step's loss names the step; the position is the data state."""

    tokens_per_step = 8

    def __init__(self, metric=lambda position: 1.0):
        self.position, self.metric = 0, metric

    def next_batch(self):
        self.position += 1
        return {}

    def loss(self, engine, batch):
        return torch.tensor(10.0 - self.position)

    def evaluate(self, engine, split):
        return {"loss": self.metric(self.position)}

    def state(self):
        return {"position": self.position}

    def load_state(self, state):
        self.position = state["position"]


def settings(tmp_path, **changes):
    values = dict(train_steps=3, log_interval=1, eval_interval=0, save_interval=3, keep_checkpoints=2,
                  checkpoint_dir=str(tmp_path / "checkpoints"))
    return LoopSettings(**{**values, **changes})


def run(s, task=None):
    """A stage's sequence: resume (when there is a checkpoint), then train."""
    engine, task = FakeEngine(), task or CountingTask()
    start = resume(engine, task, s)
    return train(engine, task, s, Monitor(engine, False, 1.0, None), start)


def client_state(s, step):
    with open(os.path.join(s.checkpoint_dir, f"global_step{step}", "client_state.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("steps", [1, 2])
def test_too_few_steps_to_leave_the_first_out_still_measure_throughput(tmp_path, steps):
    result = run(settings(tmp_path, train_steps=steps, save_interval=0))
    assert result["steps"] == steps and result["train_loss"] == 10.0 - steps and result["grad_norm"] == 0.5
    assert result["tokens_per_sec"] > 0


def test_a_resumed_run_and_a_finished_rerun_report_the_last_train_metrics(tmp_path):
    s = settings(tmp_path)
    first = run(s)
    assert first["steps"] == 3 and first["train_loss"] == 7.0 and first["tokens_per_sec"] > 0
    recorded = client_state(s, 3)["train"]
    assert recorded["train_loss"] == 7.0 and recorded["grad_norm"] == 0.5 and recorded["tokens_per_sec"] > 0

    # Nothing left to train: the checkpoint's figures, not nulls.
    again = run(s)
    assert again["steps"] == 3
    assert (again["train_loss"], again["grad_norm"], again["tokens_per_sec"]) == \
        (recorded["train_loss"], recorded["grad_norm"], recorded["tokens_per_sec"])

    # One more step: that step's loss, and a throughput measured over it.
    s.train_steps = 4
    more = run(s)
    assert more["steps"] == 4 and more["train_loss"] == 6.0 and more["tokens_per_sec"] > 0
    assert client_state(s, 4)["train"]["train_loss"] == 6.0  # the final save records it too


def test_an_early_stop_between_log_steps_reports_the_last_step_loss(tmp_path):
    # Evaluations at 2, 4, 6: the best is step 2, nothing better after -> stops at step 6, before log step 100.
    s = settings(tmp_path, train_steps=20, log_interval=100, eval_interval=2, save_interval=0, best_metric="loss",
                 higher_is_better=False, patience=2)
    result = run(s, CountingTask(metric=lambda position: 1.0 if position == 2 else 2.0))
    assert result["stopped_early"] and result["steps"] == 6
    assert result["train_loss"] == 4.0 and result["grad_norm"] == 0.5 and result["tokens_per_sec"] > 0
    # The checkpoints the tracking saves (best at 2, the stop at 6) record the loss of their own step.
    assert client_state(s, 2)["train"]["train_loss"] == 8.0 and client_state(s, 6)["train"]["train_loss"] == 4.0
    assert run(s)["train_loss"] == 4.0  # the rerun stops at once and still reports it
