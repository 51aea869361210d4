"""The default multi-node launch: `deepspeed --hostfile H` over pdsh and ssh, on one machine.

The test starts its own sshd on 127.0.0.1 (its own host key and authorized key in tmp_path; the user's
~/.ssh is not touched: an `ssh` wrapper first on PATH gives the client its config), runs a 2-rank tiny
pretrain through pdsh (`--force_multi --ssh_port`), checks it against the same run under the local
launcher (fp32, tests/conftest.py fp32_zero2_run), and stops sshd by its pid. Skipped where sshd or pdsh
is missing (Debian: apt-get install pdsh openssh-server; .ci/run installs them).
"""
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from tests.conftest import REPO, fp32_args, fp32_config, free_port, scalars

pytestmark = pytest.mark.slow
SSHD, PDSH, SSH, SSH_KEYGEN = (shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                               for name in ("sshd", "pdsh", "ssh", "ssh-keygen"))


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def sshd(tmp_path):
    """(port, environment for the launcher) of an sshd on 127.0.0.1 that lets this user in with a key in tmp_path."""
    if not (SSHD and PDSH and SSH and SSH_KEYGEN):
        pytest.skip("needs sshd, ssh and pdsh (apt-get install openssh-server pdsh)")
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
    except OSError as e:
        pytest.skip(f"cannot create /run/sshd for sshd: {e}")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    port = free_port()
    config = write(keys / "sshd_config", f"""Port {port}
ListenAddress 127.0.0.1
HostKey {keys / 'host_key'}
AuthorizedKeysFile {keys / 'user_key.pub'}
PidFile {keys / 'sshd.pid'}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel ERROR
""")
    # -D: stay in the foreground, so the process started here is sshd itself; -e: log to stderr.
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    client = write(keys / "ssh_config", f"""Host *
  IdentityFile {keys / 'user_key'}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
""")
    bin_dir = tmp_path / "bin"  # deepspeed's ssh check and pdsh's ssh module both run `ssh` from PATH
    bin_dir.mkdir()
    wrapper = write(bin_dir / "ssh", f'#!/bin/sh\nexec {SSH} -F {client} "$@"\n')
    wrapper.chmod(0o755)
    # What the ranks need besides PYTHON* variables reaches them through the env file (DS_ENV_FILE).
    env_file = write(tmp_path / "deepspeed_env", "DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DS_ENV_FILE": str(env_file),
           "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    try:
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.skip(f"sshd did not start: {server.stderr.read() if server.poll() is not None else 'timeout'}")
                time.sleep(0.2)
        yield port, env
    finally:
        server.terminate()  # our own sshd, by its pid
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_two_ranks_over_pdsh_and_ssh_match_the_local_launcher(sshd, fp32_zero2_run, prepared, tmp_path):
    port, env = sshd
    # The same run as tests/conftest.py fp32_zero2_run (fp32 ZeRO-2, 2 ranks, its fixed 12-step schedule), 4 steps.
    args = fp32_args(prepared, fp32_config(tmp_path), tmp_path / "pdsh", steps=4) + [
        "--eval-interval", "0", "--save-interval", "0"]
    hostfile = write(tmp_path / "hostfile", "localhost slots=2\n")
    run = tmp_path / "pdsh"
    r = subprocess.run(["deepspeed", "--hostfile", str(hostfile), "--force_multi", "--ssh_port", str(port),
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "pipeline/pretrain.py",
                        *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "cmd = pdsh -S -f 1024 -w localhost " in r.stdout + r.stderr  # through pdsh, not the local launcher
    summary = json.load(open(run / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 4
    over_ssh, local = scalars(run, "Train/loss"), scalars(fp32_zero2_run, "Train/loss")
    assert sorted(over_ssh) == [1, 2, 3, 4]
    assert over_ssh == pytest.approx({step: local[step] for step in over_ssh}, abs=1e-4)
