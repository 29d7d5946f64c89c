"""Unix-socket paths kvmkit listens on (the API socket, a restored vsock device's socket)."""

from __future__ import annotations

import errno
import os
import socket
import stat


def remove_stale_socket(path: str | os.PathLike[str]) -> None:
    """Make way for a new listener at `path`. A socket file left by a process that is gone
    (a connect is refused: nobody listens) is removed; a live one, or a file that is not a
    socket, raises OSError and is left alone."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Non-blocking: a live listener whose backlog is full answers EAGAIN at once, which is
    # "live" too; only ECONNREFUSED says that nobody listens any more.
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except FileNotFoundError:
        return  # removed meanwhile
    except BlockingIOError:
        pass
    except OSError as err:
        raise OSError(err.errno, f"{path}: is it in use? connect: {err.strerror}") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another process is serving this socket")
