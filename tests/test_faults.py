"""Fault injection on 2 CPU ranks, one run folder stopped at one point per phase of a run: a rank that
raises ends the whole job quickly with its error first; runs killed with SIGKILL at many points (a rank,
the launcher, mid-save, mid-load, mid-evaluation) and a checkpoint that cannot be written (a full disk, a
file-size limit: the run stops without damaging what was saved) resume to exactly the uninterrupted loss
curve. The faults come from tests/inject_fault.py, which patches library functions around the unchanged
stage."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import REPO, fp32_args, fp32_config, free_port, run_as_main, scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """zero2.json in fp32 with a fixed 12-step schedule (tests/conftest.py fp32_config)."""
    return fp32_config(tmp_path_factory.mktemp("faults"))


def launch(args, fault=None, stage="pretrain", **popen):
    """The stage under `deepspeed --num_gpus 2`, through the fault wrapper when `fault` is given."""
    script = ["tests/inject_fault.py", stage] if fault else [f"pipeline/{stage}.py"]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *script, *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **({"FAULT": fault} if fault else {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(run):
    return [v for _, v in sorted(scalars(run, "Train/loss").items())]


def kill_launcher_when_paused(proc) -> tuple[float, str]:
    """SIGKILL the `deepspeed` launcher once a rank has paused (tests/inject_fault.py `pause`); returns
    the seconds until every rank had exited too (their stdout closed) and the stdout read until the pause."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("PAUSED"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    done = threading.Event()

    def drain():
        proc.stdout.read()  # EOF once no rank holds the pipe
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    assert done.wait(60), "ranks kept running after the launcher was killed"
    proc.wait()
    return time.monotonic() - killed, "".join(lines)


def test_runs_stopped_at_every_phase_resume_to_the_uninterrupted_curve(fp32_zero2_run, prepared, config, tmp_path):
    """One run folder through one fault per phase of a run, each rerun resuming from what the previous one left
    (a rank that raises before any checkpoint; SIGKILL inside DeepSpeed's save, between DeepSpeed's files and the
    RNG file, before `latest`, during an evaluation; a full disk during a save; a file-size limit; the launcher
    killed; SIGKILL while loading on resume and while removing old checkpoints); the last rerun finishes on
    exactly the uninterrupted loss curve."""
    import resource

    run = tmp_path / "run"
    args = fp32_args(prepared, config, run)
    checkpoints = run / "checkpoints"

    def latest():
        return (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").exists() else None

    def stopped(expected, fault):
        assert latest() == expected, f"after {fault}: latest names {latest()}, expected {expected}"
        assert not (run / "summary.json").exists() and not (run / "hf").exists(), fault

    def killed(fault, expected):
        rc, out, err = finish(launch(args, fault))
        assert rc != 0 and "exits with return code = -9" in out + err, f"{fault}: not killed\n{err[-3000:]}"
        stopped(expected, fault)
        return out

    # A rank that raises (before any checkpoint) ends the whole job quickly, its error first.
    start = time.monotonic()
    rc, out, err = finish(launch(args, "raise:3:1"), timeout=300)
    seconds = time.monotonic() - start
    assert rc != 0 and seconds < 120, (rc, seconds)
    first = err.index("RuntimeError: injected failure on rank 1 at step 3")
    # Only the failing rank's own traceback comes before its message: no peer's error, no hang report.
    assert err[:first].count("Traceback") == 1 and "Gloo" not in err[:first], err[:first + 200]
    stopped(None, "raise:3:1")

    # SIGKILL (fault, the checkpoint `latest` must name afterwards); each rerun resumes from there.
    killed("save:3:1", None)             # rank 1 killed inside DeepSpeed's save of step 3
    out = killed("rng:3:0", None)        # rank 0 killed after DeepSpeed's files, before its RNG file
    assert "global_step3 is incomplete" in out  # what save:3:1 left was found and removed
    killed("latest:3:0", None)           # every file written, killed just before `latest`
    killed("eval:4:0", "global_step3")   # killed during the evaluation at step 4

    # Not foreseeable: the disk fills during the save of step 6 (every rank's torch.save fails). The run stops
    # naming the checkpoint; `latest` is unchanged.
    rc, out, err = finish(launch(args, "full:6:all"))
    assert rc != 0 and "at step 3" in out, err[-3000:]
    assert "could not write checkpoint" in err and "No space left on device" in err, err[-3000:]
    assert "`latest` still names global_step3" in err
    stopped("global_step3", "full:6:all")

    # Foreseeable: a file-size limit below a checkpoint file is refused before the first step.
    def limit_files(size=64 * 1024):
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    rc, out, err = finish(launch(args, preexec_fn=limit_files))
    assert rc != 0 and "file-size limit (ulimit -f)" in err and "--save-interval 0" in err, err[-2000:]
    assert "global_step6 is incomplete" in out  # the failed save was found and removed on resume
    assert "step      4/" not in out  # refused before training
    stopped("global_step3", "ulimit -f")

    # With room again the rerun resumes from global_step3; the launcher is killed (kill -9) at step 7.
    seconds, out = kill_launcher_when_paused(launch(args, "pause:7:0"))
    assert seconds < 30, f"ranks took {seconds:.0f} s to stop after the launcher was killed"
    assert "at step 3" in out
    stopped("global_step6", "pause:7:0")
    killed("load:0:1", "global_step6")   # killed while loading the checkpoint on resume
    killed("rotate:9:0", "global_step9")  # killed while removing global_step3 after `latest` named step 9

    rc, out, err = finish(launch(args))
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "at step 9" in out
    assert losses(run) == pytest.approx(losses(fp32_zero2_run), abs=1e-5)
    assert json.load(open(run / "summary.json"))["train_loss"] == pytest.approx(
        json.load(open(fp32_zero2_run / "summary.json"))["train_loss"], abs=1e-5)
    # The half-removed global_step3 went with the next rotation.
    assert sorted(t for t in os.listdir(checkpoints) if t.startswith("global_step")) == ["global_step12",
                                                                                         "global_step9"]


def test_an_unwritable_run_folder_is_refused_before_any_process_starts(prepared, config, tmp_path, monkeypatch,
                                                                      capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = run_as_main("pipeline.pretrain", fp32_args(prepared, config, blocker / "run"), monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "pretrain: error:" in err and str(blocker) in err, err[-2000:]
