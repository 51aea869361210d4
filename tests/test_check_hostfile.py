"""tools/check_hostfile.py: DeepSpeed's hostfile rules, every problem with its line, quoted commands."""
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import check_hostfile  # noqa: E402


def test_layout_and_commands(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=4\n\nnode-b slots=2  # spare\n")
    assert check_hostfile.main([str(hostfile), "--", "pipeline/pretrain.py", "--data", "my data; rm -rf /"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s), world size 6" in out and "ranks 0..3" in out and "ranks 4..5" in out
    assert "--master_addr node-a" in out and "--no_ssh --node_rank 1" in out
    assert "'my data; rm -rf /'" in out  # values reach a shell only quoted


def test_every_problem_is_reported_with_its_line(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots two\na slots=1\nc slots=0\n")
    assert check_hostfile.main([str(hostfile)]) == 2
    err = capsys.readouterr().err
    assert f"{hostfile}:2:" in err and f"{hostfile}:3: host 'a' again (first on line 1)" in err
    assert f"{hostfile}:4: host 'c' has slots=0" in err


def test_shipped_hostfiles_parse():
    for name in os.listdir(os.path.join(REPO, "hostfiles")):
        hosts, problems = check_hostfile.parse_hostfile(os.path.join(REPO, "hostfiles", name))
        assert hosts and not problems, name


def test_user_at_host_is_accepted_as_deepspeed_and_pdsh_do(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("alice@node-a slots=2\nbob@10.0.0.2 slots=2\n-x@node-c slots=1\nalice@-oProxyCommand=x slots=1\n")
    hosts, problems = check_hostfile.parse_hostfile(str(hostfile))
    assert list(hosts) == ["alice@node-a", "bob@10.0.0.2"]
    assert [p.split(":")[1] for p in problems] == ["3", "4"]  # a leading - (an ssh option) on either side is not
    hostfile.write_text("alice@node-a slots=2\nbob@10.0.0.2 slots=2\n")
    assert check_hostfile.main([str(hostfile)]) == 0
    out = capsys.readouterr().out
    assert "--master_addr node-a" in out and "alice@node-a" in out  # the address without the user
