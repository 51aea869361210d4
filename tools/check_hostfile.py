"""Check a DeepSpeed hostfile and print the world layout and the exact launch commands.

    python tools/check_hostfile.py hostfiles/two_nodes
    python tools/check_hostfile.py hostfiles/two_nodes --check-ssh --ssh-port 22 -- pipeline/pretrain.py --data d ...

Parses exactly as `deepspeed` does (`HOST slots=N` per line, `#` comments and blank lines ignored; a
host listed twice is an error) but reports every bad line with its number at once. A host name must
look like one (letters, digits, `.`, `-`, `_`, `:` and `[]%` for IPv6, `user@` before it as pdsh and ssh
take it, not starting with `-`): deepspeed hands it to pdsh and ssh, so a name with shell metacharacters,
or one that ssh would read as an option, is an error here. `slots=0` is refused on purpose, stricter than
deepspeed (which accepts it and starts no rank there): a node listed with nothing to run is a typo or a
line to delete. `--check-ssh`
tries password-less ssh to each host (BatchMode, with a timeout) and checks that pdsh is installed,
which the default multi-node launch needs. Everything after `--` is the script and its arguments for
the printed commands; each value is shell-quoted.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections import OrderedDict

LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # deepspeed.launcher.runner._parse_hostfile's pattern
HOSTNAME = re.compile(r"^([A-Za-z0-9_.][A-Za-z0-9_.-]*@)?[A-Za-z0-9_.:\[\]%][A-Za-z0-9_.:\[\]%-]*$")  # [user@]DNS name/IPv4/IPv6


def parse_hostfile(path: str) -> tuple[OrderedDict, list[str]]:
    """(host -> slots in file order, problems as 'PATH:LINE: message')."""
    hosts: OrderedDict[str, int] = OrderedDict()
    first_seen: dict[str, int] = {}
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = LINE.search(line)
            if not match:
                problems.append(f"{path}:{number}: {line!r} is not 'HOSTNAME slots=N'")
                continue
            host, slots = match.group(1), int(match.group(2))
            if not HOSTNAME.match(host):
                problems.append(f"{path}:{number}: {host!r} is not a host name (expected [user@]host of letters, digits "
                                "and . - _ : [ ] %, not starting with -)")
                continue
            if host in first_seen:
                problems.append(f"{path}:{number}: host {host!r} again (first on line {first_seen[host]}); "
                                "deepspeed refuses duplicate hosts")
                continue
            if slots == 0:  # deepspeed accepts it (no rank there); refused here on purpose: a typo or a dead line
                problems.append(f"{path}:{number}: host {host!r} has slots=0; give it at least one or remove the line")
            first_seen[host] = number
            hosts[host] = slots
    if not hosts and not problems:
        problems.append(f"{path}: no hosts (expected lines like 'node1 slots=8')")
    return hosts, problems


def check_ssh(host: str, port: int | None, timeout: int) -> str | None:
    """None when `ssh host true` works without a password, else the error."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", "-o", "StrictHostKeyChecking=accept-new"]
    if port:
        cmd += ["-p", str(port)]
    try:
        # A list, no shell; "--" ends ssh's options, so the host can never be read as one.
        r = subprocess.run([*cmd, "--", host, "true"], capture_output=True, text=True, timeout=timeout + 5)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


def launch_commands(hostfile: str, hosts: OrderedDict, script: list[str], master_port: int,
                    ssh_port: int | None) -> tuple[str, list[str]]:
    """(the default pdsh/ssh command run on the first node, one --no_ssh command per node), each a shell
    command line in which every value (hostfile path, host, script arguments) is quoted with shlex."""
    master = next(iter(hosts)).split("@")[-1]  # user@node1: the address is node1
    ssh = ["--ssh_port", str(ssh_port)] if ssh_port else []
    default = shlex.join(["deepspeed", "--hostfile", hostfile, *ssh, "--master_addr", master,
                          "--master_port", str(master_port), *script])
    per_node = [shlex.join(["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(i), "--master_addr",
                            master, "--master_port", str(master_port), *script]) for i in range(len(hosts))]
    return default, per_node


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    script = argv[argv.index("--") + 1:] if "--" in argv else ["pipeline/pretrain.py", "ARGS..."]
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hostfile", help="the hostfile to check")
    p.add_argument("--check-ssh", action="store_true", help="try password-less ssh to every host and look for pdsh")
    p.add_argument("--ssh-port", type=int, help="ssh port, if not 22 (passed to deepspeed as --ssh_port)")
    p.add_argument("--ssh-timeout", type=int, default=5, help="seconds per ssh attempt (default: 5)")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on the first host (default: 29500)")
    args = p.parse_args(own)
    for flag, port in (("--ssh-port", args.ssh_port), ("--master-port", args.master_port)):
        if port is not None and not 0 < port < 65536:
            p.error(f"{flag} {port}: a port is between 1 and 65535")
    if args.ssh_timeout <= 0:
        p.error(f"--ssh-timeout must be positive, got {args.ssh_timeout}")

    try:
        hosts, problems = parse_hostfile(args.hostfile)
    except OSError as e:
        print(f"check_hostfile: error: {args.hostfile}: {e.strerror}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2

    world, rank = sum(hosts.values()), 0
    print(f"{len(hosts)} node(s), world size {world}")
    for node, (host, slots) in enumerate(hosts.items()):
        print(f"  node {node}: {host:<24} slots {slots:<3} ranks {rank}..{rank + slots - 1}")
        rank += slots

    failures = 0
    if args.check_ssh:
        if len(hosts) > 1 and shutil.which("pdsh") is None:
            print("error: pdsh is not installed; the default multi-node launch needs it "
                  "(apt-get install pdsh), or use the --no_ssh commands below", file=sys.stderr)
            failures += 1
        for host in hosts:
            error = check_ssh(host, args.ssh_port, args.ssh_timeout)
            print(f"  ssh {host}: {'ok' if error is None else 'FAILED: ' + error}")
            failures += error is not None

    default, per_node = launch_commands(args.hostfile, hosts, script, args.master_port, args.ssh_port)
    print("\nlaunch from the first node (pdsh over ssh; put DS_ACCELERATOR, OMP_NUM_THREADS etc. in .deepspeed_env):")
    print(f"  {default}")
    print("\nor, without ssh, run on each node (same code, paths and environment everywhere):")
    for node, cmd in enumerate(per_node):
        print(f"  node {node}: {cmd}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
