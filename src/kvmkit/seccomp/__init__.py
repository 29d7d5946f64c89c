"""Per-thread seccomp filters for a kvmkit VMM process (docs/security.md).

A filter is a list of allowed system calls (and, for `ioctl`, allowed request numbers) per
thread kind, written in Firecracker's seccompiler JSON format (Firecracker docs/seccompiler.md):
a top-level object mapping a thread category to `{"default_action", "filter_action",
"filter": [{"syscall", "args": [{"index", "type", "op", "val"}]}]}`. Firecracker's categories
are `vmm` (the main thread), `api` and `vcpu`; kvmkit adds its own thread kinds (`virtio`,
`console`, `drain`, `watch`, `input`, see kvmkit/threads.py), each falling back to `vmm`
when a file does not name it.

libseccomp (through the pyseccomp binding) turns each filter into BPF once, when the policy is
installed; each thread then loads its kind's program as the first thing it does
(`threads.name_thread`). The kernel stacks filters: a thread starts under the filter of the
thread that created it and adds its own, so a call must pass both. The threads that create
others (`vmm`, and `api`, whose requests build the VM) therefore allow what their children
need; the leaf kinds (vCPU, virtio worker, console, ...) get only their own calls.

A forbidden call is trapped (SECCOMP_RET_TRAP): the SIGSYS handler writes one line naming the
thread and the call to stderr and to the kvmkit logger, then ends the process with exit status
148, as Firecracker does (its `BadSyscall` exit code).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmkit.errors import UserError

log = logging.getLogger("kvmkit.seccomp")

# Firecracker's exit code after a bad system call (FcExitCode::BadSyscall).
EXIT_BAD_SYSCALL = 148
# Firecracker's three thread categories (docs/seccomp.md); a --seccomp-filter file needs them.
FIRECRACKER_CATEGORIES = ("vmm", "api", "vcpu")
# kvmkit's further thread kinds (threads.ThreadKind values): optional in a file, `vmm` if absent.
KVMKIT_CATEGORIES = ("virtio", "console", "drain", "watch", "input")
CATEGORIES = FIRECRACKER_CATEGORIES + KVMKIT_CATEGORIES

# <linux/prctl.h>, <linux/seccomp.h>, <asm/unistd_64.h>, <asm-generic/siginfo.h>
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SYS_SECCOMP = 317
SIGSYS = 31
SA_SIGINFO = 4
SI_SYSCALL_OFFSET = 24  # siginfo_t: signo, errno, code, pad (4 x int), then _sigsys._call_addr
SYS_SECCOMP_CODE = 1  # si_code of a seccomp SIGSYS
SYS_IOCTL = 16
# ucontext_t on x86-64 (glibc <sys/ucontext.h>): uc_flags, uc_link, uc_stack (24 bytes), then
# mcontext's gregs[], in which REG_RSI is 9: the offset of the second system call argument.
UC_GREG_RSI = 8 + 8 + 24 + 9 * 8

# libseccomp's actions (<seccomp.h>): the values of SCMP_ACT_*.
ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_TRAP = 0x00030000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000
ACT_ERRNO = 0x00050000
ACT_TRACE = 0x7FF00000
# libseccomp's comparison operators (enum scmp_compare).
OPS = {"ne": 1, "lt": 2, "le": 3, "eq": 4, "ge": 5, "gt": 6, "masked_eq": 7}
DWORD_MASK = 0xFFFFFFFF
# Looked up (and not found) where the filters would be installed, as a mark in an strace log.
INSTALL_MARK = "/kvmkit-seccomp-install-point"
MAX_FILE = 1 << 20  # a filter file larger than this is refused (Firecracker's are ~30 KiB)


class SeccompError(UserError):
    """A filter file that cannot be used: one line, exit status 2."""


@dataclass(frozen=True)
class Condition:
    index: int
    dword: bool
    op: str
    val: int
    mask: int = 0


@dataclass(frozen=True)
class Rule:
    syscall: str
    conditions: tuple[Condition, ...] = ()


@dataclass
class Filter:
    default_action: int
    filter_action: int
    rules: list[Rule] = field(default_factory=list)


Filters = dict[str, Filter]


def _action(value: Any, where: str) -> int:
    named = {"allow": ACT_ALLOW, "trap": ACT_TRAP, "log": ACT_LOG, "kill_process": ACT_KILL_PROCESS,
             "kill_thread": ACT_KILL_THREAD, "kill": ACT_KILL_PROCESS}  # fmt: skip
    if isinstance(value, str) and value.lower() in named:
        return named[value.lower()]
    if isinstance(value, dict) and len(value) == 1:
        ((key, num),) = value.items()
        if key in ("errno", "trace") and isinstance(num, int) and not isinstance(num, bool):
            if not 0 <= num <= 0xFFFF:
                raise SeccompError(f"{where}: {key} {num} is out of range 0..65535")
            return (ACT_ERRNO if key == "errno" else ACT_TRACE) | num
    raise SeccompError(
        f"{where}: unknown action {json.dumps(value)} (allow, trap, log, kill_process, "
        'kill_thread, {"errno": N} or {"trace": N})'
    )


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SeccompError(f"{where} must be an integer, not {json.dumps(value)}")
    return value


def _condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, dict):
        raise SeccompError(f"{where} must be an object")
    # Firecracker's seccompiler names the keys `index`/`type` (older releases `arg_index`/
    # `arg_type`); both are read.
    index = _int(raw.get("index", raw.get("arg_index")), f"{where}.index")
    kind = raw.get("type", raw.get("arg_type"))
    if not 0 <= index <= 5:
        raise SeccompError(f"{where}.index {index}: a system call has arguments 0..5")
    if kind not in ("dword", "qword"):
        raise SeccompError(f"{where}.type must be \"dword\" or \"qword\", not {json.dumps(kind)}")
    op = raw.get("op")
    mask = 0
    if isinstance(op, dict) and set(op) == {"masked_eq"}:
        mask = _int(op["masked_eq"], f"{where}.op.masked_eq")
        op = "masked_eq"
    if op not in OPS or (op == "masked_eq" and not mask):
        raise SeccompError(
            f"{where}.op must be one of eq, ne, lt, le, gt, ge or {{\"masked_eq\": MASK}}, "
            f"not {json.dumps(raw.get('op'))}"
        )
    val = _int(raw.get("val"), f"{where}.val")
    limit = DWORD_MASK if kind == "dword" else (1 << 64) - 1
    if not 0 <= val <= limit or not 0 <= mask <= limit:
        raise SeccompError(f"{where}.val {val} does not fit a {kind}")
    return Condition(index, kind == "dword", op, val, mask)


def parse_filters(data: Any, source: str, *, require: tuple[str, ...] = FIRECRACKER_CATEGORIES
                  ) -> dict[str, Filter]:  # fmt: skip
    """Firecracker's seccompiler JSON (already decoded) -> one `Filter` per category."""
    if not isinstance(data, dict):
        raise SeccompError(f"{source}: the top level must be an object of thread categories")
    missing = [c for c in require if c not in data]
    if missing:
        raise SeccompError(f"{source}: no filter for thread category {', '.join(missing)}")
    filters: dict[str, Filter] = {}
    names = _syscall_numbers()
    for category, body in data.items():
        where = f"{source}: {category}"
        if category not in CATEGORIES:
            raise SeccompError(
                f"{where}: unknown thread category (known: {', '.join(CATEGORIES)})"
            )
        if not isinstance(body, dict):
            raise SeccompError(f"{where} must be an object")
        unknown = set(body) - {"default_action", "filter_action", "filter", "comment"}
        if unknown:
            raise SeccompError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        for key in ("default_action", "filter_action", "filter"):
            if key not in body:
                raise SeccompError(f"{where}: {key} is missing")
        default = _action(body["default_action"], f"{where}.default_action")
        match = _action(body["filter_action"], f"{where}.filter_action")
        if default == match:
            raise SeccompError(f"{where}: default_action and filter_action are the same")
        rules_raw = body["filter"]
        if not isinstance(rules_raw, list):
            raise SeccompError(f"{where}.filter must be a list")
        rules = []
        for i, raw in enumerate(rules_raw):
            rwhere = f"{where}.filter[{i}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("syscall"), str):
                raise SeccompError(f"{rwhere} must be an object with a \"syscall\" name")
            extra = set(raw) - {"syscall", "args", "comment"}
            if extra:
                raise SeccompError(f"{rwhere}: unknown key {sorted(extra)[0]!r}")
            if raw["syscall"] not in names:
                raise SeccompError(f"{rwhere}: unknown system call {raw['syscall']!r}")
            args = raw.get("args", [])
            if not isinstance(args, list):
                raise SeccompError(f"{rwhere}.args must be a list")
            conds = tuple(_condition(a, f"{rwhere}.args[{j}]") for j, a in enumerate(args))
            rules.append(Rule(raw["syscall"], conds))
        filters[category] = Filter(default, match, rules)
    return filters


def load_filter_file(path: Path) -> dict[str, Filter]:
    """Read and check a --seccomp-filter file (Firecracker's JSON format)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as err:
        raise SeccompError(f"--seccomp-filter {path}: {err.strerror}") from None
    if len(raw) > MAX_FILE:
        raise SeccompError(f"--seccomp-filter {path}: larger than {MAX_FILE} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SeccompError(f"--seccomp-filter {path}: not valid JSON: {err}") from None
    filters = parse_filters(data, f"--seccomp-filter {path}")
    for f_ in filters.values():
        compile_filter(f_)  # refused here, before any thread runs under it
    return filters


def default_filters() -> dict[str, Filter]:
    """kvmkit's own filters: default.json beside this module, measured (docs/security.md)."""
    # Beside this file (package data; importlib.resources would cost the start-up its
    # tempfile/shutil imports, bench/startup.py).
    text = Path(__file__).with_name("default.json").read_text()
    return parse_filters(json.loads(text), "kvmkit/seccomp/default.json")


_names_cache: dict[str, int] = {}


def _syscall_numbers() -> dict[str, int]:
    """Every x86-64 system call name libseccomp knows -> its number."""
    if not _names_cache:
        cached = _bpf_cache().get("names")
        if isinstance(cached, dict) and cached:
            _names_cache.update(cached)
            return _names_cache
        from kvmkit.seccomp.binding import load

        pyseccomp = load()

        arch = pyseccomp.system_arch()
        for nr in range(512):
            try:
                name = pyseccomp.resolve_syscall(arch, nr)
            except (OSError, ValueError):
                continue
            if name:
                _names_cache[name.decode()] = nr
        _bpf_cache_store("names", dict(_names_cache))
    return _names_cache


# The compiled programs and libseccomp's system call names, kept between processes: importing
# pyseccomp runs ctypes.util.find_library twice (each an `ldconfig -p` subprocess), so
# compiling kvmkit's filters at every start cost ~60-120 ms before the API socket listened
# (bench/startup.py); with the cache, a start with filters on only reads one small JSON file.
# Firecracker avoids the same cost by compiling its filters at build time (seccompiler).
# An entry is keyed by the whole filter (its repr: every rule, condition and action), so it
# can only stand for the same rules; the file is trusted only when this user owns it and no
# one else may write it, and the names only while libseccomp's file is the one they came from.
BPF_CACHE_VERSION = 1
MAX_CACHE_FILE = 4 << 20
MAX_BPF = 4096 * 8  # BPF_MAXINSNS instructions of 8 bytes (<linux/bpf_common.h>)
_cache: dict[str, Any] | None = None


def _bpf_cache_path() -> Path | None:
    """None where the process has no cache directory: no $KVMKIT_CACHE, $XDG_CACHE_HOME or
    $HOME and no passwd entry, as in kvmkit-jailer's jail (docs/security.md)."""
    from kvmkit.cache import cache_dir

    try:
        return cache_dir(create=False) / f"seccomp-bpf-v{BPF_CACHE_VERSION}.json"
    except RuntimeError:  # Path.home(): "Could not determine home directory"
        return None


def _libseccomp_identity() -> list[Any] | None:
    """libseccomp's file as this process mapped it (path, size, mtime), None if not mapped."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libseccomp" in line:
                    path = line.split(None, 5)[-1].strip()
                    st = os.stat(path)
                    return [path, st.st_size, st.st_mtime_ns]
    except (OSError, IndexError):
        pass
    return None


def _bpf_cache() -> dict[str, Any]:
    """The cache's contents ({} when absent, unusable, not this user's or stale)."""
    global _cache
    if _cache is not None:
        return _cache
    _cache = {}
    path = _bpf_cache_path()
    if path is None:
        return _cache
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_size > MAX_CACHE_FILE:
                return _cache
            data = json.loads(f.read(MAX_CACHE_FILE))
        lib = data["libseccomp"]
        st = os.stat(lib[0])
        if [lib[0], st.st_size, st.st_mtime_ns] != lib or not isinstance(data["programs"], dict):
            return _cache
        _cache = data
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return _cache


def _bpf_cache_store(key: str, value: Any) -> None:
    """Record `value` under `key` (best effort: a cache that cannot be written only costs
    the next start its compile)."""
    lib = _libseccomp_identity()
    if lib is None:
        return
    data = _bpf_cache()
    if data.get("libseccomp") != lib:
        data.clear()
        data.update({"libseccomp": lib, "programs": {}})
    if key == "names":
        data["names"] = value
    else:
        data["programs"][key] = value
    path = _bpf_cache_path()
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW  # no one's planted link
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # atomic: a concurrent start reads the old file or this one
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def compile_filter(f: Filter) -> bytes:
    """The filter as a BPF program (struct sock_filter array), generated by libseccomp (or
    as libseccomp generated it for the same filter before: the cache above)."""
    key = repr(f)
    cached = _bpf_cache().get("programs", {}).get(key)
    if isinstance(cached, str):
        try:
            program = bytes.fromhex(cached)
        except ValueError:
            program = b""
        if program and len(program) % 8 == 0 and len(program) <= MAX_BPF:
            return program
    program = _compile_filter(f)
    _bpf_cache_store(key, program.hex())
    return program


def _compile_filter(f: Filter) -> bytes:
    from kvmkit.seccomp.binding import load

    pyseccomp = load()

    ctx = pyseccomp.SyscallFilter(f.default_action)
    # A call made with another architecture's ABI (int 0x80, x32) gets the default action.
    ctx.set_attr(pyseccomp.Attr.ACT_BADARCH, f.default_action)
    for rule in f.rules:
        args = []
        for c in rule.conditions:
            if c.op == "masked_eq":
                args.append(pyseccomp.Arg(c.index, OPS["masked_eq"], c.mask, c.val))
            elif c.dword and c.op == "eq":
                # A dword compares the low 32 bits only, as seccompiler does: a request number
                # the caller sign-extended (ctypes c_int) still matches.
                args.append(pyseccomp.Arg(c.index, OPS["masked_eq"], DWORD_MASK, c.val))
            else:
                args.append(pyseccomp.Arg(c.index, OPS[c.op], c.val))
        try:
            ctx.add_rule(f.filter_action, rule.syscall, *args)
        except OSError as err:
            raise SeccompError(
                f"seccomp: libseccomp refused the rule for {rule.syscall}: {err.strerror or err}"
            ) from None
    import tempfile  # here: not part of every process's start-up (bench/startup.py)

    with tempfile.TemporaryFile() as out:
        ctx.export_bpf(out)
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Sigaction(ctypes.Structure):
    # glibc's struct sigaction on x86-64: handler, 1024-bit sa_mask, sa_flags, sa_restorer.
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]  # fmt: skip


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


@dataclass
class Policy:
    programs: dict[str, bytes]
    names: dict[int, str]
    ioctls: dict[int, str] = field(default_factory=dict)
    buffers: dict[str, Any] = field(default_factory=dict)

    def category(self, kind: str) -> str:
        return kind if kind in self.programs else "vmm"


_policy: Policy | None = None
_libc: ctypes.CDLL | None = None
_handler_ref: Any = None
_state = threading.local()
_reporting = threading.Lock()


def active() -> bool:
    """Whether this process runs under kvmkit's filters."""
    return _policy is not None


def _on_sigsys(signum: int, info: int | None, context: int | None) -> None:
    """SIGSYS from SECCOMP_RET_TRAP: say which thread made which call, then end the process.

    Runs in the offending thread, whose call did not happen. Only writes and _exit follow, so
    the handler needs nothing beyond what every filter allows."""
    # One line per process: when two threads trap at once (two vCPUs' first KVM_RUN), the
    # second waits here (a futex, which every filter allows) while the first ends the process.
    _reporting.acquire()
    nr = ctypes.c_int.from_address(info + SI_SYSCALL_OFFSET).value if info else -1
    policy = _policy
    name = policy.names.get(nr, "?") if policy is not None else "?"
    if nr == SYS_IOCTL and context:
        # Which request: the filters allow ioctl per request number, so the number is what
        # a developer extending the lists needs (the call's second argument, in rsi).
        req = ctypes.c_ulong.from_address(context + UC_GREG_RSI).value & DWORD_MASK
        known = policy.ioctls.get(req) if policy is not None else None
        name += f" request {req:#x}" + (f" {known}" if known else "")
    thread = threading.current_thread().name
    category = getattr(_state, "category", None)
    # A thread that loaded no filter of its own (an API connection, metrics) runs under
    # those of the thread that started it.
    which = f"{category} filter" if category else "its creator's filter"
    line = (
        f"kvmkit: seccomp: thread {thread} ({which}) made the forbidden system "
        f"call {nr} ({name}); shutting down the VM (exit status {EXIT_BAD_SYSCALL})"
    )
    try:
        os.write(2, (line + "\n").encode())
        for handler in logging.getLogger("kvmkit").handlers:
            handler.handle(log.makeRecord(log.name, logging.CRITICAL, "", 0, line, (), None))
            handler.flush()
    finally:
        os._exit(EXIT_BAD_SYSCALL)


def install(filters: dict[str, Filter]) -> None:
    """Compile `filters`, install the SIGSYS handler and put the calling thread (the main
    thread) under the `vmm` filter. Threads started afterwards load their kind's filter."""
    global _policy, _libc, _handler_ref
    if _policy is not None:
        raise RuntimeError("seccomp filters are already installed")
    programs = {name: compile_filter(f) for name, f in filters.items()}
    numbers = _syscall_numbers()
    # A module first imported after this point (kvmkit imports devices lazily) must not try
    # to write its bytecode cache: the mkdir/openat of __pycache__ is not in the vcpu and
    # virtio lists, and a jail's read-only library mounts refuse it anyway.
    sys.dont_write_bytecode = True
    _libc = ctypes.CDLL(None, use_errno=True)
    _handler_ref = _HANDLER(_on_sigsys)
    act = _Sigaction()
    act.handler = ctypes.cast(_handler_ref, ctypes.c_void_p).value
    act.flags = SA_SIGINFO
    if _libc.sigaction(SIGSYS, ctypes.byref(act), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sigaction(SIGSYS): {os.strerror(err)}")
    _policy = Policy(programs, {nr: name for name, nr in numbers.items()}, ioctl_names())
    enter("vmm")


def ioctl_names() -> dict[int, str]:
    """The ioctl request numbers kvmkit knows (kvmkit/abi) -> their names, for the SIGSYS
    line and scripts/seccomp_profile.py's comments."""
    from kvmkit.abi import ioctls, tun
    from kvmkit.abi.constants import KVMIO

    names: dict[int, str] = {}
    # An ioctl number carries its type in bits 8..15 (<asm-generic/ioctl.h>): KVMIO for
    # KVM's, 'T' for the tun driver's; other constants of those modules are not requests.
    for module, prefix, kind in ((tun, "", ord("T")), (ioctls, "KVM_", KVMIO)):
        for attr, value in vars(module).items():
            if attr.isupper() and isinstance(value, int) and (value >> 8) & 0xFF == kind:
                names.setdefault(value & DWORD_MASK, prefix + attr)
    return names


def enter(kind: str) -> None:
    """Put the calling thread under the filter of thread kind `kind` (a no-op when the
    process runs without filters)."""
    policy = _policy
    if policy is None:
        return
    category = policy.category(kind)
    program = policy.programs[category]
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    assert _libc is not None
    # No new privileges: the kernel's condition for an unprivileged filter, and what
    # Firecracker sets too.
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")
    if _libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                     ctypes.c_long(0), ctypes.byref(prog)) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    _state.category = category


def cli_filters(enabled: bool, filter_file: Path | None) -> Filters | None:
    """The VMM command lines' --seccomp-filter/--no-seccomp: the filters to install (the
    file's, checked and compiled now, or kvmkit's default), or None without filters. Under
    KVMKIT_SECCOMP_STRACE (the measurement of docs/security.md) the process runs unfiltered
    so that strace sees every call it would make."""
    if not enabled:
        if filter_file is not None:
            raise SeccompError("--seccomp-filter and --no-seccomp exclude each other")
        if os.environ.get("KVMKIT_SECCOMP_STRACE_ACTIVE"):
            # Measured all the same: install_for_cli only marks the trace where the filters
            # would go (the process stays unfiltered), so runs without filters count too.
            return default_filters()
        return None
    return load_filter_file(filter_file) if filter_file is not None else default_filters()


def install_for_cli(filters: Filters, prog: str) -> None:
    """`install`, or under KVMKIT_SECCOMP_STRACE a mark in the trace where it would happen
    (scripts/seccomp_profile.py counts the main thread's calls from there on)."""
    if os.environ.get("KVMKIT_SECCOMP_STRACE_ACTIVE"):
        with contextlib.suppress(OSError):
            os.stat(INSTALL_MARK)
        return
    try:
        install(filters)
    except OSError as err:
        raise UserError(f"cannot install the seccomp filters: {err}") from None


def start_strace() -> None:
    """Under KVMKIT_SECCOMP_STRACE=DIR (the measurement of docs/security.md), attach
    `strace -f` to this process, writing DIR/kvmkit.PID.strace for scripts/seccomp_profile.py,
    and return once it is attached; otherwise do nothing.

    strace runs as a child that attaches to this process (rather than this process re-running
    itself under strace), so the VMM keeps its pid: the signals a test or a launcher sends
    reach it, and strace ends when it does."""
    out = os.environ.get("KVMKIT_SECCOMP_STRACE")
    if not out or os.environ.get("KVMKIT_SECCOMP_STRACE_ACTIVE"):
        return
    os.environ["KVMKIT_SECCOMP_STRACE_ACTIVE"] = "1"
    me = os.getpid()
    path = os.path.join(out, f"kvmkit.{me}.strace")
    argv = ["strace", "-f", "-qq", "-e", "raw=ioctl", "-s", "32", "-o", path, "-p", str(me)]
    # Yama's ptrace_scope 1 lets only an ancestor trace a process unless it names its tracer.
    PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, -1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY & (1 << 64) - 1), 0, 0, 0)
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = Path("/proc/self/status").read_text()
        if any(line.startswith("TracerPid:") and line.split()[1] != "0"
               for line in status.splitlines()):  # fmt: skip
            return
        if os.waitpid(child, os.WNOHANG) != (0, 0):
            break
        time.sleep(0.01)
    raise UserError(f"KVMKIT_SECCOMP_STRACE: strace did not attach ({' '.join(argv)})")
