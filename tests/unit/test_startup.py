"""What a VMM process loads before its API socket serves (issue 20, bench/startup.py measures
the time): the API server and the action layer leave the devices, the VMM and the snapshot
code until a VM is started or loaded, and seccomp filters compiled once are taken from the
cache by later processes instead of being compiled again (libseccomp through pyseccomp).
Behaviour in fresh interpreters, not timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Packages whose import is the work of InstanceStart or a snapshot load, not of start-up.
HEAVY = ("kvmkit.devices", "kvmkit.vmm", "kvmkit.snapshot", "kvmkit.boot", "kvmkit.migration",
         "kvmkit.kvm.vm", "kvmkit.kvm.vcpu", "kvmkit.abi.structs", "kvmkit.memory")  # fmt: skip
# Standard-library modules that only the boot or a rare request needs (http.server's email
# and ssl, OpenSSL through hashlib, importlib.resources' tempfile).
HEAVY_STDLIB = ("http.server", "http.client", "email", "ssl", "_ssl", "hashlib", "_hashlib",
                "tempfile", "pyseccomp")  # fmt: skip


def loaded_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods for h in HEAVY + HEAVY_STDLIB if m == h or m.startswith(h + "."))


def test_api_server_and_actions_import_no_vmm() -> None:
    mods = loaded_after("import kvmkit.api.server, kvmkit.api.actions, kvmkit.cli.api_run")
    assert "kvmkit.api.actions" in mods
    assert heavy(mods) == []


def test_a_serving_vmm_has_loaded_nothing_heavy(tmp_path: Path) -> None:
    """kvmkit-firecracker's own code path up to served reads, in one process: Vmm created on
    the main thread, the server started, `GET /` and `GET /machine-config` answered. (A
    configuration PUT validates with the device's config class, which lives in its device
    module: that request loads it.)"""
    sock = tmp_path / "api.sock"
    code = f"""
import socket, sys
from kvmkit.api.actions import Vmm
from kvmkit.api.server import ApiServer
vmm = Vmm()
server = ApiServer(vmm, {str(sock)!r}).start()
for request in (b"GET / HTTP/1.1\\r\\n\\r\\n",
                b"GET /machine-config HTTP/1.1\\r\\n\\r\\n"):
    s = socket.socket(socket.AF_UNIX)
    s.connect({str(sock)!r})
    s.sendall(request)
    reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    s.close()
server.close()
"""
    mods = loaded_after(code)
    assert "kvmkit.api.server" in mods and "kvmkit.kvm.kick" in mods
    assert heavy(mods) == []


def test_firecracker_parser_does_not_import_cli_run() -> None:
    mods = loaded_after("from kvmkit.cli.firecracker import build_parser\n"
                        "build_parser().parse_args(['--api-sock', '/tmp/x', '--seccomp'])")
    assert "kvmkit.cli.run" not in mods
    assert heavy(mods) == []


SECCOMP = """
import sys
from kvmkit import seccomp
filters = seccomp.cli_filters(True, None)
programs = {name: seccomp.compile_filter(f).hex() for name, f in sorted(filters.items())}
names = seccomp._syscall_numbers()
import json
print(json.dumps({"pyseccomp": "pyseccomp" in sys.modules, "programs": programs,
                  "openat": names["openat"]}))
"""


def run_seccomp(cache: Path) -> dict[str, object]:
    env = dict(os.environ, KVMKIT_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-c", SECCOMP], capture_output=True, text=True,
                         check=True, env=env)  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_seccomp_programs_come_from_the_cache(tmp_path: Path) -> None:
    pytest.importorskip("pyseccomp")
    first = run_seccomp(tmp_path)
    assert first["pyseccomp"] is True  # compiled by libseccomp
    (cache,) = tmp_path.glob("seccomp-bpf-*.json")
    assert cache.stat().st_mode & 0o077 == 0
    second = run_seccomp(tmp_path)
    assert second["pyseccomp"] is False  # nothing compiled: libseccomp not even loaded
    assert second["programs"] == first["programs"] and second["openat"] == 257
    # Another user could have written a group-writable file: it is not trusted.
    cache.chmod(0o620)
    assert run_seccomp(tmp_path)["pyseccomp"] is True
    # A damaged file is ignored and replaced: the programs are libseccomp's again.
    cache.write_text('{"libseccomp": 1, "programs": ')
    cache.chmod(0o600)
    third = run_seccomp(tmp_path)
    assert third["pyseccomp"] is True and third["programs"] == first["programs"]
    assert run_seccomp(tmp_path)["pyseccomp"] is False


def test_a_cached_program_only_stands_for_its_own_rules(tmp_path: Path) -> None:
    """An entry is keyed by the whole filter: changed rules are compiled, not looked up."""
    pytest.importorskip("pyseccomp")
    first = run_seccomp(tmp_path)
    (cache,) = tmp_path.glob("seccomp-bpf-*.json")
    data = json.loads(cache.read_text())
    # Each key is its filter's rules: entries for other rules (openat renamed) are not used.
    data["programs"] = {k.replace("'openat'", "'open_by_handle_at'"): v
                        for k, v in data["programs"].items()}  # fmt: skip
    cache.write_text(json.dumps(data))
    cache.chmod(0o600)
    second = run_seccomp(tmp_path)
    assert second["pyseccomp"] is True and second["programs"] == first["programs"]
