"""The system calls and file work behind `kvmkit-jailer` (cli/jailer.py): mount and pid
namespaces, pivot_root into the jail, the read-only view of the Python runtime inside it,
device nodes, cgroup v2 and dropping every privilege. Follows Firecracker's docs/jailer.md
("Jailer Operation"); docs/security.md says what the jail holds and why.

Everything here runs in the jailer process, single-threaded (setns into a mount namespace
and unshare(CLONE_NEWNS) refuse multi-threaded callers: setns(2), unshare(2)).
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.errors import UserError

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# <linux/mount.h> (mount(2))
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2  # umount2(2)
# <linux/prctl.h>
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl): glibc has no
# pivot_root wrapper, and capset's is in libcap, not libc.
SYS_CAPSET = 126
SYS_PIVOT_ROOT = 155
LINUX_CAPABILITY_VERSION_3 = 0x20080522  # <linux/capability.h>

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None),
           f"mount {target}")  # fmt: skip


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), os.fsencode(new_root),
                         os.fsencode(put_old)), "pivot_root")  # fmt: skip


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def drop_privileges(uid: int, gid: int, last_cap: int) -> None:
    """Become uid:gid with no capability in any set (capabilities(7)): the bounding set is
    emptied while CAP_SETPCAP is still held, the ambient set cleared, supplementary groups
    dropped; setresuid to a non-zero uid then clears the permitted and effective sets (the
    kernel's rule for a root process becoming non-root without SECBIT_KEEP_CAPS), and capset
    clears the inheritable set, which setuid keeps. no_new_privs: no later execve can gain
    privileges (setuid files, file capabilities)."""
    for cap in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), data), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# -- what the exec file needs inside the jail ------------------------------------------------

# Standard library extension modules no VMM imports, whose libraries (Tk and X11, ncurses,
# readline, dbm, NIS and Kerberos) the jail therefore leaves out.
UNUSED_EXTENSIONS = frozenset(
    {"_tkinter", "_curses", "_curses_panel", "readline", "_dbm", "_gdbm", "nis"}
)
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def shebang(path: Path) -> str | None:
    """The interpreter named by a `#!` line, or None for a binary."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip()
    return os.fsdecode(line.split()[0]) if line else None


def python_runtime(interpreter: str) -> list[str]:
    """The host paths a Python program needs to run under `interpreter` (this process's own
    Python, checked by the caller): the interpreter, pyvenv.cfg, every sys.path entry (the
    standard library, lib-dynload, site-packages, kvmkit's own source for an editable
    install), the shared libraries the interpreter, the standard library's extension modules
    (but UNUSED_EXTENSIONS) and libseccomp load (found by ldd before the chroot; kvmkit's
    third-party runtime dependency, pyseccomp, is pure Python), and the loader's cache so
    that dlopen by name works. Nothing else of the host is visible in the jail."""
    paths: list[str] = [interpreter]
    venv_cfg = Path(sys.prefix) / "pyvenv.cfg"
    if venv_cfg.is_file():
        paths.append(str(venv_cfg))
    # sys.path[0] is this program's own directory (or the current one), not the VMM's.
    entries = sys.path if sys.flags.safe_path else sys.path[1:]
    for entry in entries:
        if entry and os.path.isabs(entry) and os.path.exists(entry):
            paths.append(entry)
    objects = [os.path.realpath(interpreter)]
    for entry in entries:
        if os.path.basename(entry) == "lib-dynload" and os.path.isdir(entry):
            objects += [os.path.join(entry, f) for f in sorted(os.listdir(entry))
                        if f.endswith(".so") and f.split(".")[0] not in UNUSED_EXTENSIONS]
    seccomp_lib = _libseccomp_path()
    if seccomp_lib is not None:
        from kvmkit.seccomp.binding import SONAME

        objects.append(seccomp_lib)
        paths.append(seccomp_lib)
        soname = os.path.join(os.path.dirname(seccomp_lib), SONAME)
        if os.path.exists(soname):
            paths.append(soname)  # the link dlopen(SONAME) finds through the loader cache
    paths += sorted(shared_libraries(objects))
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    return paths


def _libseccomp_path() -> str | None:
    """Where libseccomp (pyseccomp's library) lives on the host: loaded here, then read from
    /proc/self/maps; find_library alone gives a name, and needs ldconfig, which the jail
    lacks (kvmkit/seccomp/binding.py)."""
    try:
        from kvmkit.seccomp.binding import load

        load()
    except (OSError, RuntimeError, ImportError):
        return None
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and "/libseccomp.so" in parts[5]:
                return parts[5]
    return None


def shared_libraries(objects: Iterable[str]) -> set[str]:
    """Every library ldd says these ELF objects load (one ldd run for all of them)."""
    files = [o for o in objects if os.path.isfile(o)]
    if not files:
        return set()
    proc = subprocess.run(["ldd", *files], capture_output=True, text=True, timeout=60,
                          env={"LC_ALL": "C", "PATH": os.defpath})  # fmt: skip
    found = set()
    for line in proc.stdout.splitlines():
        m = _LDD_PATH.search(line)
        if m and os.path.isfile(m.group(1)):
            found.add(m.group(1))
    return found


@dataclass
class RuntimeView:
    """Host paths made visible read-only inside a jail at their own path: the components
    on the way are made in the jail (directories, and the host's symlinks as symlinks), the
    last one is bind-mounted read-only, nosuid, nodev."""

    root: str
    mounted: list[str] = field(default_factory=list)  # host real paths bind-mounted

    def expose(self, path: str) -> None:
        pending = [c for c in path.split("/") if c]
        current = "/"
        hops = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                current = os.path.dirname(current.rstrip("/")) or "/"
                continue
            host = os.path.join(current, name)
            if any(host == m or host.startswith(m + "/") for m in self.mounted):
                return  # already visible through a mounted directory
            inside = self.root + host
            if os.path.islink(host):
                hops += 1
                if hops > 40:  # the kernel's own limit on symlinks in one lookup (ELOOP)
                    raise OSError(f"{path}: too many symbolic links")
                target = os.readlink(host)
                if not os.path.lexists(inside):
                    os.symlink(target, inside)
                if target.startswith("/"):
                    current = "/"
                pending = [c for c in target.split("/") if c] + pending
                continue
            if pending:
                if not os.path.isdir(inside):
                    os.mkdir(inside, 0o755)
                current = host
                continue
            self._bind(host, inside)

    def _bind(self, host: str, inside: str) -> None:
        if os.path.isdir(host):
            os.makedirs(inside, 0o755, exist_ok=True)
        elif not os.path.exists(inside):
            with open(inside, "x"):
                pass
        mount(host, inside, None, MS_BIND | MS_REC)
        # A bind mount takes the read-only flag only on a remount (mount(2), MS_BIND).
        mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        self.mounted.append(host)


# -- cgroup v2 --------------------------------------------------------------------------------


def cgroup2_mount() -> str | None:
    """The cgroup v2 hierarchy's mount point, from /proc/mounts (as Firecracker finds it)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1].replace("\\040", " ")
    return None


def controller_of(setting: str) -> str | None:
    """`pids.max` -> `pids`; the `cgroup.` core files belong to no controller."""
    name = setting.split(".", 1)[0]
    return None if name == "cgroup" else name


@dataclass
class Cgroup:
    base: str  # the cgroup2 mount
    relative: str  # <parent_cgroup>/<id>
    created: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.base, self.relative)

    def check(self, settings: list[tuple[str, str]]) -> None:
        available = Path(self.base, "cgroup.controllers").read_text().split()
        for key, _value in settings:
            ctrl = controller_of(key)
            if ctrl is not None and ctrl not in available:
                raise UserError(
                    f"--cgroup {key}: the {ctrl} controller is not available in the cgroup v2 "
                    f"hierarchy at {self.base} (it has: {' '.join(available) or 'none'})"
                )

    def create(self, settings: list[tuple[str, str]]) -> None:
        """mkdir every level (keeping the ones that exist), enable the controllers the
        settings need in each ancestor's cgroup.subtree_control (cgroup-v2.rst, "Enabling
        and Disabling"), write the settings, then move this process in."""
        parts = [p for p in self.relative.split("/") if p]
        wanted = {c for k, _ in settings if (c := controller_of(k)) is not None}
        current = self.base
        for part in parts:
            if wanted:
                enabled = Path(current, "cgroup.subtree_control").read_text().split()
                for ctrl in sorted(wanted - set(enabled)):
                    Path(current, "cgroup.subtree_control").write_text(f"+{ctrl}")
            current = os.path.join(current, part)
            if not os.path.isdir(current):
                os.mkdir(current)
                self.created.append(current)
        for key, value in settings:
            target = os.path.join(self.path, key)
            if "/" in key or not os.path.isfile(target):
                raise UserError(f"--cgroup {key}: no such file in {self.path}")
            try:
                Path(target).write_text(value)
            except OSError as err:
                raise UserError(f"--cgroup {key}={value}: {err.strerror}") from None
        Path(self.path, "cgroup.procs").write_text(str(os.getpid()))

    def undo(self) -> None:
        """Leave the cgroup (back to the hierarchy's root) and remove what create made."""
        if not self.created:
            return
        try:
            Path(self.base, "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            pass
        for path in reversed(self.created):
            try:
                os.rmdir(path)
            except OSError:
                pass


def device_node(host: str, inside: str, mode: int, uid: int, gid: int) -> None:
    """A character device node in the jail with the host node's numbers (mknod(2))."""
    st = os.stat(host)
    if not stat.S_ISCHR(st.st_mode):
        raise OSError(f"{host} is not a character device")
    if os.path.lexists(inside):
        os.unlink(inside)
    os.mknod(inside, stat.S_IFCHR | mode, st.st_rdev)
    os.chown(inside, uid, gid)
    os.chmod(inside, mode)  # the umask does not narrow it
