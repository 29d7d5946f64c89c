"""Build kvmkit's default seccomp filters (src/kvmkit/seccomp/default.json) from strace logs.

Measure, then generate (docs/security.md):

    rm -rf /tmp/kvmkit-strace && mkdir /tmp/kvmkit-strace
    KVMKIT_SECCOMP_STRACE=/tmp/kvmkit-strace .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/kvm/test_api.py ...            # any tests that run kvmkit VMM processes
    .venv/bin/python scripts/seccomp_profile.py /tmp/kvmkit-strace [more dirs...] \\
        > src/kvmkit/seccomp/default.json

or, to add a new code path's calls to the lists in the tree, measure only the tests of that
path and keep the rest (`--merge`; write to another file first: the shell truncates the
output before the script reads it):

    .venv/bin/python scripts/seccomp_profile.py --merge src/kvmkit/seccomp/default.json \\
        /tmp/kvmkit-strace > /tmp/default.json && mv /tmp/default.json src/kvmkit/seccomp/

Under KVMKIT_SECCOMP_STRACE=DIR every `kvmkit run`/`restore`/`kvmkit-firecracker` process has
`strace -f` attach to it (it runs without filters) and log to DIR/kvmkit.PID.strace. This
script attributes each call to a thread kind: a thread's kind is the prefix of the name it
gives itself (prctl(PR_SET_NAME, "vcpu-0"): threads.name_thread); until then it is its
creator's, whose filter it runs under; the main thread is `vmm`. Calls of the main thread
are counted from the mark seccomp.install_for_cli leaves where the filters would be
installed. The filters:
each leaf kind (vcpu, virtio, console, drain, watch, input) allows the calls seen in its
threads plus BASE; `vmm` and `api`, whose threads create all the others (a thread starts
under its creator's filter, and the kernel stacks filters), allow the union of everything.
`ioctl` is allowed per request number.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kvmkit.abi.constants import KVMIO
from kvmkit.seccomp import CATEGORIES, INSTALL_MARK, ioctl_names

# What any Python thread may call at any moment, whether a test run saw it in that kind of
# thread or not: the allocator (brk, mmap, munmap, mremap, madvise, mprotect), the GIL and
# locks (futex, sched_yield), returning from a signal handler (rt_sigreturn), a thread's end
# (exit; exit_group for the process), time (clock_gettime when the vDSO is not used,
# clock_nanosleep), and write, which the SIGSYS handler uses to report a forbidden call.
BASE = (
    "brk", "mmap", "munmap", "mremap", "madvise", "mprotect", "futex", "sched_yield",
    "rt_sigreturn", "rt_sigprocmask", "exit", "exit_group", "gettid", "getpid",
    "clock_gettime", "clock_nanosleep", "restart_syscall", "write",
)  # fmt: skip
# The calls a thread makes to put itself under its filter (threads.name_thread: PR_SET_NAME,
# PR_SET_NO_NEW_PRIVS, seccomp) run under its creator's filter: vmm and api allow them.
SPAWNER = ("prctl", "seccomp")
KINDS = CATEGORIES
# Calls of a kind that tests rarely reach, added from reading the code: a vCPU exit that ends
# the VM (poweroff, reset, triple fault: Machine._finish) kicks the other vCPUs with a signal
# (kvm/kick.py: pthread_kill, i.e. tgkill).
EXTRA = {"vcpu": ("tgkill",)}

# KVM ioctls numbered in linux/kvm.h's vCPU range that act on the VM's fd only (kvm.h and the
# KVM API doc, section 4): not added to the vcpu filter unless a vCPU thread was seen making
# them.
VM_FD_ONLY = ("KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_CREATE_DEVICE", "KVM_CLEAR_DIRTY_LOG")

LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>(.*)|(\w+)\((.*))$")
NAME = re.compile(r'PR_SET_NAME, "([^"]*)"')
IOCTL_REQ = re.compile(r"^\s*(?:0x[0-9a-f]+|\d+),\s*(0x[0-9a-f]+|\d+)")
RESULT = re.compile(r"=\s+(\d+)(?:\s|$)")


def parse(path: Path, calls: dict[str, set[str]], reqs: dict[str, set[int]]) -> None:
    kind: dict[int, str] = {}
    main = None
    started = False
    pending: dict[int, bool] = {}  # pid -> its unfinished clone makes a thread
    processes: set[int] = set()  # child processes (vfork, fork): not kvmkit's threads
    for line in path.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        pid = int(m.group(1))
        if main is None:
            main = pid
            kind[pid] = "vmm"
        name = m.group(2) or m.group(4)
        rest = m.group(3) if m.group(2) else m.group(5)
        if name == "newfstatat" and INSTALL_MARK in rest and pid == main:
            started = True
            continue
        if pid in processes:
            continue
        if pid not in kind:
            # A new task may log before its creator's clone returns: it belongs to a pending
            # clone; a thread takes its creator's kind, a process (vfork, fork) is not ours.
            parents = [p for p, thread in pending.items() if thread]
            if parents:
                kind[pid] = kind[parents[0]]
            elif pending:
                processes.add(pid)
                continue
            else:
                kind[pid] = "vmm"
        k = kind[pid]
        if name in ("clone", "clone3", "fork", "vfork"):
            if not m.group(2):
                pending[pid] = name != "vfork" and "CLONE_THREAD" in rest
            if r := RESULT.search(rest):
                child = int(r.group(1))
                if pending.pop(pid, False):
                    kind.setdefault(child, k)
                elif child not in kind:
                    processes.add(child)
        if name == "prctl" and (n := NAME.search(rest)):
            prefix = n.group(1).split("-", 1)[0]
            if prefix in KINDS:
                kind[pid] = prefix
        if not started:
            continue
        if m.group(2):  # a resumed call was counted when it started
            continue
        calls[k].add(name)
        if name == "ioctl" and (r := IOCTL_REQ.match(rest)):
            reqs[k].add(int(r.group(1), 0))


def merge(path: Path, calls: dict[str, set[str]], reqs: dict[str, set[int]]) -> None:
    """Count the rules of an existing filter file (default.json) as seen: a new measurement
    of a new code path then adds to the lists instead of replacing them."""
    data = json.loads(path.read_text())
    for k, body in data.items():
        for rule in body["filter"]:
            calls[k].add(rule["syscall"])
            if rule["syscall"] == "ioctl":
                reqs[k].add(rule["args"][0]["val"])


def build(dirs: list[Path], base: Path | None = None) -> dict[str, object]:
    calls: dict[str, set[str]] = defaultdict(set)
    reqs: dict[str, set[int]] = defaultdict(set)
    files = [p for d in dirs for p in sorted(d.glob("kvmkit.*.strace"))]
    if not files:
        raise SystemExit(f"no kvmkit.*.strace files in {', '.join(map(str, dirs))}")
    if base is not None:
        merge(base, calls, reqs)
    for path in files:
        parse(path, calls, reqs)
    every = set().union(*calls.values())
    every_req = set().union(*reqs.values())
    names = ioctl_names()
    # A paused vCPU's state is read and written on its own thread (snapshots, restore),
    # which a run shows or not by timing: the vCPU threads may make every KVM ioctl seen
    # anywhere or defined in kvmkit/abi in linux/kvm.h's vCPU range (nr 0x80 and up). Their
    # creators' filters (vmm, api), which the kernel stacks under theirs, allow them too.
    vcpu_range = {
        r for r in every_req | set(names)
        if (r >> 8) & 0xFF == KVMIO and r & 0xFF >= 0x80 and names.get(r) not in VM_FD_ONLY
    }  # fmt: skip
    out: dict[str, object] = {}
    for k in KINDS:
        if k in ("vmm", "api"):
            allowed = every | set(BASE) | set(SPAWNER) | {c for e in EXTRA.values() for c in e}
            allowed_reqs = every_req | vcpu_range
        elif k in calls:
            allowed, allowed_reqs = calls[k] | set(BASE) | set(EXTRA.get(k, ())), reqs[k]
            if k == "vcpu":
                allowed_reqs = allowed_reqs | vcpu_range
                allowed.add("ioctl")
        else:
            continue  # never seen: the kind falls back to vmm's filter
        rules: list[dict[str, object]] = []
        for call in sorted(allowed):
            if call == "ioctl":
                for req in sorted(allowed_reqs):
                    rules.append({"syscall": "ioctl", "args": [
                        {"index": 1, "type": "dword", "op": "eq", "val": req,
                         "comment": names.get(req, hex(req))}]})  # fmt: skip
            else:
                rules.append({"syscall": call})
        out[k] = {"default_action": "trap", "filter_action": "allow", "filter": rules}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="directories of kvmkit.*.strace")
    parser.add_argument("--merge", type=Path, metavar="FILE",
                        help="keep FILE's rules (e.g. the current default.json) and add the "
                        "calls the traces show")  # fmt: skip
    args = parser.parse_args()
    data = build(args.dirs, args.merge)
    text = json.dumps(data, indent=1)
    # One rule per line: the file diffs well when a call is added.
    text = re.sub(r"\{\s+\"syscall\": \"(\w+)\"\s+\}", r'{"syscall": "\1"}', text)
    print(text)


if __name__ == "__main__":
    main()
