"""Fault injection on 2 CPU ranks: runs killed with SIGKILL at many points (a rank, the launcher,
mid-save, mid-load, mid-evaluation) resume to exactly the uninterrupted loss curve; a rank that raises
ends the whole job quickly with its error first; a checkpoint that cannot be written stops the run
without damaging what was saved. The faults come from tests/inject_fault.py, which patches library
functions around the unchanged stage."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, free_port, scalars

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def fp32_config(tmp_path_factory):
    """zero2.json in fp32 (this CPU emulates bf16 slowly; the fault handling does not depend on precision),
    a fixed 12-step schedule so a stopped run and the uninterrupted one follow the same LR."""
    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero2.json")))
    ds["bf16"] = {"enabled": False}
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=2)
    path = tmp_path_factory.mktemp("faults") / "zero2_fp32.json"
    path.write_text(json.dumps(ds))
    return str(path)


def args_for(prepared, config, run):
    return ["--data", prepared, "--model", "tiny", "--deepspeed_config", config, "--output", str(run),
            "--train-steps", str(STEPS), "--seq-length", "32", "--log-interval", "1", "--eval-interval", "4",
            "--eval-batches", "1", "--save-interval", "3", "--keep-checkpoints", "2", "--seed", "5"]


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


@pytest.fixture(scope="module")
def reference(prepared, fp32_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    rc, out, err = finish(launch(args_for(prepared, fp32_config, run)))
    assert rc == 0, err[-3000:]
    return run


def kill_launcher_when_paused(proc) -> float:
    """SIGKILL the `deepspeed` launcher once a rank has paused (tests/inject_fault.py `pause`); returns
    the seconds until every rank had exited too (their stdout closed)."""
    for line in proc.stdout:
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
    return time.monotonic() - killed


def test_runs_killed_at_ten_points_resume_to_the_uninterrupted_curve(reference, prepared, fp32_config, tmp_path):
    run = tmp_path / "run"
    args = args_for(prepared, fp32_config, run)
    checkpoints = run / "checkpoints"
    # (fault, the checkpoint `latest` must name afterwards); each rerun resumes from there.
    faults = [("step:2:1", None),       # a rank killed before any checkpoint
              ("save:3:1", None),       # rank 1 killed inside DeepSpeed's save of step 3
              ("rng:3:0", None),        # rank 0 killed after DeepSpeed's files, before its RNG file
              ("latest:3:0", None),     # every file written, killed just before `latest`
              ("eval:4:0", "global_step3"),    # killed during the evaluation at step 4
              ("step:5:0", "global_step3"),    # rank 0 killed between checkpoints
              ("pause:7:0", "global_step6"),   # the launcher killed (kill -9) at step 7
              ("load:0:1", "global_step6"),    # killed while loading the checkpoint on resume
              ("rotate:9:0", "global_step9"),  # killed while removing global_step3 after `latest` named step 9
              ("save:12:0", "global_step9")]   # rank 0 killed inside the final save
    for fault, expected in faults:
        if fault.startswith("pause"):
            seconds = kill_launcher_when_paused(launch(args, fault))
            assert seconds < 30, f"ranks took {seconds:.0f} s to stop after the launcher was killed"
        else:
            rc, out, err = finish(launch(args, fault))
            assert rc != 0 and "exits with return code = -9" in out + err, f"{fault}: not killed\n{err[-3000:]}"
        latest = (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").exists() else None
        assert latest == expected, f"after {fault}: latest names {latest}, expected {expected}"
        assert not (run / "summary.json").exists() and not (run / "hf").exists()

    rc, out, err = finish(launch(args))
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "at step 9" in out
    assert "global_step12 is incomplete" in out  # the partial final checkpoint was found and removed
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)
    assert json.load(open(run / "summary.json"))["train_loss"] == pytest.approx(
        json.load(open(reference / "summary.json"))["train_loss"], abs=1e-5)


def test_a_rank_that_raises_ends_the_job_quickly_with_its_error_first(prepared, fp32_config, tmp_path):
    start = time.monotonic()
    rc, out, err = finish(launch(args_for(prepared, fp32_config, tmp_path / "run"), "raise:3:1"), timeout=300)
    seconds = time.monotonic() - start
    assert rc != 0 and seconds < 120, (rc, seconds)
    first = err.index("RuntimeError: injected failure on rank 1 at step 3")
    # Only the failing rank's own traceback comes before its message: no peer's error, no hang report.
    assert err[:first].count("Traceback") == 1 and "Gloo" not in err[:first], err[:first + 200]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_latest_intact(prepared, fp32_config, tmp_path):
    import resource

    run = tmp_path / "run"
    args = args_for(prepared, fp32_config, run)
    # Not foreseeable: the disk fills during a save (of step 6; step 3 was saved). The run stops naming the
    # checkpoint, `latest` is unchanged and the rerun resumes from it.
    code = ("import os, sys, errno, torch\n"
            "real = torch.save\n"
            "def full(obj, f, *a, **k):\n"
            "    if 'global_step6' in str(f): raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
            "    return real(obj, f, *a, **k)\n"
            "torch.save = full\n"
            "from pipeline.cli import run_main\nimport pipeline.pretrain as m\n"
            "run_main(lambda: m.main(sys.argv[1:]), 'pretrain')\n")
    script = tmp_path / "disk_full.py"
    script.write_text(code)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script), *args]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "could not write checkpoint" in r.stderr and "No space left on device" in r.stderr, r.stderr[-3000:]
    assert "`latest` still names global_step3" in r.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step3"

    # Foreseeable: a file-size limit below a checkpoint file is refused before the first step.
    def limit_files(size=64 * 1024):
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    rc, out, err = finish(launch(args, preexec_fn=limit_files))
    assert rc != 0 and "file-size limit (ulimit -f)" in err and "--save-interval 0" in err, err[-2000:]
    assert "global_step6 is incomplete" in out  # the failed save was found and removed on resume
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step3"
    assert "step      4/" not in out  # refused before training

    rc, out, err = finish(launch(args))
    assert rc == 0 and "at step 3" in out, err[-2000:]


def test_an_unwritable_run_folder_is_refused_before_any_process_starts(prepared, fp32_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "pipeline.pretrain", *args_for(prepared, fp32_config, blocker / "run")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pretrain: error:" in r.stderr and str(blocker) in r.stderr, r.stderr[-2000:]
