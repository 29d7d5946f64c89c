"""Fetch Debian packages and unpack them into kvmkit's cache, without installing them.

`apt-get download` fetches a .deb through the machine's configured apt sources (the only
network these build machines have) and `dpkg-deb -x` unpacks it into a private tree.  Nothing
touches the host's dpkg database, so this works for kernels and tools that must not be
installed on the host.  Unpacking goes to a temporary directory renamed into place, under a
lock, so concurrent kvmkit processes never see half-unpacked trees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvmkit.errors import UserError

STAMP = ".kvmkit-unpacked.json"


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise UserError(f"{what}: `{argv[0]}` not found (this needs a Debian-based host)")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise UserError(f"{what}: {' '.join(argv)} failed: {last}")
    return proc.stdout


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def candidate_version(package: str) -> str | None:
    """The version apt would fetch for `package`, or None if apt does not know it."""
    out = _run(["apt-cache", "policy", package], f"looking up {package}")
    match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
    if match is None or match.group(1) == "(none)":
        return None
    return match.group(1)


def depends_of(package: str) -> list[str]:
    """The direct `Depends:` of `package` as apt-cache reports them."""
    out = _run(["apt-cache", "depends", package], f"looking up {package}")
    return re.findall(r"^\s*\|?Depends:\s*(\S+)", out, re.MULTILINE)


def download(package: str, dest: Path) -> Path:
    """`apt-get download` `package` into directory `dest`; return the .deb's path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    # As root apt drops privileges to `_apt`, which cannot write into a private cache dir
    # under /root; downloading as the invoking user avoids a noisy warning and a failure.
    argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=" + _sandbox_user(), package]
    _run(argv, f"downloading {package}", cwd=dest)
    new = sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob(f"{package}_*.deb"))
    if not new:
        raise UserError(f"downloading {package}: apt-get reported success but left no .deb")
    return new[-1]


def _sandbox_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def extract(deb: Path, dest: Path) -> None:
    """`dpkg-deb -x` `deb` into `dest` (which must not exist yet)."""
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")


def unpacked(dest: Path) -> dict[str, str] | None:
    """The stamp of a completely unpacked tree at `dest`, or None."""
    try:
        data = json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fetch_unpacked(package: str, dest: Path, log: bool = True) -> dict[str, str]:
    """Make `dest` hold `package` unpacked (fetching it once); return its stamp.

    The stamp records the package name and version.  An existing complete tree is reused
    without asking apt anything, so warm runs work offline.
    """
    stamp = unpacked(dest)
    if stamp is not None:
        return stamp
    with locked(dest.parent / f".{dest.name}.lock"):
        stamp = unpacked(dest)
        if stamp is not None:  # another process finished it while we waited
            return stamp
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
            work = Path(tmp)
            if log:
                print(f"kvmkit: fetching {package} with apt-get download", flush=True,
                      file=sys.stderr)
            deb = download(package, work / "deb")
            if log:
                print(f"kvmkit: unpacking {deb.name} into {dest}", flush=True, file=sys.stderr)
            tree = work / "tree"
            extract(deb, tree)
            version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "unknown"
            stamp = {"package": package, "version": version.replace("%3a", ":")}
            (tree / STAMP).write_text(json.dumps(stamp) + "\n")
            if dest.exists():  # a stale, incomplete tree from an interrupted run
                shutil.rmtree(dest)
            os.rename(tree, dest)
        return stamp

