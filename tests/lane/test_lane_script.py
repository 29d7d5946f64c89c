"""The lane's per-run script and share/environment choices, checked on the host (no boot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.lane import runner


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (busybox-static)")
def test_run_script_passes_argv_env_and_cwd_exactly(tmp_path: Path) -> None:
    argv = [sys.executable, "-c",
            "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), "
            "os.environ.get('WEIRD'), os.environ.get('KVMKIT_IN_LANE')]))",
            "it's", "$HOME", "a\nb", "", "--x=y", "*"]
    cwd = tmp_path / "dir with space, comma"
    cwd.mkdir()
    env = runner.lane_environment({"WEIRD": "q'\"$x\n`y`", "PATH": os.environ["PATH"]}, [])
    script = tmp_path / "run.sh"
    script.write_text(runner.run_script(argv, cwd, env, [Path("/x'y")]))
    # Run the generated kvmkit_command as the lane's stage 2 does, but on the host.
    proc = subprocess.run(
        ["busybox", "sh", "-c", f'BB=$(command -v busybox); . "{script}"; kvmkit_command'],
        capture_output=True, text=True, check=True,
    )
    args, seen_cwd, weird, in_lane = json.loads(proc.stdout)
    assert args == argv[3:]
    assert seen_cwd == str(cwd)
    assert weird == "q'\"$x\n`y`"
    assert in_lane == "1"


def test_writable_shares_are_deduplicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub").mkdir()
    cache = repo / "cache"
    cache.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("KVMKIT_CACHE", str(cache))
    shares = runner.writable_shares(repo / "sub", [other, repo / "sub", Path("/")])
    assert shares == [other, repo] or shares == sorted([other, repo], key=str)
    with pytest.raises(runner.UserError):
        runner.writable_shares(repo, [tmp_path / "missing"])


def test_environment_drops_host_only_variables(tmp_path: Path) -> None:
    env = runner.lane_environment(
        {"SSH_AUTH_SOCK": "/run/x", "TMPDIR": "/tmp/elsewhere", "KVMKIT_CACHE": "/c",
         "PATH": "/bin"},
        [tmp_path],
    )
    assert "SSH_AUTH_SOCK" not in env and "TMPDIR" not in env
    assert env["KVMKIT_CACHE"] == "/c" and env["KVMKIT_IN_LANE"] == "1"
    kept = runner.lane_environment({"TMPDIR": str(tmp_path / "t")}, [tmp_path])
    assert kept["TMPDIR"] == str(tmp_path / "t")
