"""`kvmkit run --api-sock PATH` / `--config-file F` (and `kvmkit-firecracker`): a VMM
driven by kvmkit's Firecracker-compatible API.

The socket serves from the moment the process starts. With a kernel or a command on the
command line, or a config file, the VM boots at once and the socket controls it; with only
`--api-sock` it waits for configuration and InstanceStart, as Firecracker does. The guest's
console goes to stdout (a command's output only, with `-- COMMAND`). The process ends with
the VM, with `kvmkit run`'s exit statuses.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvmkit import seccomp
from kvmkit.api.actions import ApiError, Vmm
from kvmkit.errors import UserError
from kvmkit.seccomp import Filters as SeccompFilters


def load_config_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"--config-file {path}: {err.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise UserError(f"--config-file {path}: not valid JSON: {err}") from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def run_api(
    *, api_sock: str | None, config_file: Path | None, kernel: Path | None = None,
    initrd: Path | None = None, cmdline: str | None = None, vcpus: int = 1,
    mem_mib: int = 256, command: list[str] | None = None, timeout: float | None = None,
    instance_id: str = "anonymous-instance", prog: str = "kvmkit run",
    extra_config: dict[str, Any] | None = None, virtio_transport: str = "mmio",
    boot_timer: bool = False,
    start_times: tuple[int | None, int | None, int | None] = (None, None, None),
    mmds_size_limit: int | None = None, mmds_data: Any = None, firecracker_exit: bool = False,
    seccomp_filters: SeccompFilters | None = None, nested: bool = False,
) -> int:  # fmt: skip
    """Serve the API (and boot what the arguments or config file describe) until the VM
    ends; returns the process's exit status: `kvmkit run`'s, or with `firecracker_exit`
    Firecracker's 0 for a guest that powered off or rebooted (its `reboot=k` way out)."""
    from kvmkit.api.server import ApiServer

    if seccomp_filters is not None:
        # Before the API thread exists: from here on every thread of the process runs under
        # a filter (docs/security.md).
        seccomp.install_for_cli(seccomp_filters, prog)

    # Started with descriptor 1 closed, Python has no sys.stdout: the console then goes
    # nowhere (as to a closed pipe: EPIPE/EBADF drop it), and the VM runs on.
    stdout = sys.stdout.buffer if sys.stdout is not None else None

    def write_out(data: bytes) -> None:
        if stdout is None:
            return
        try:
            stdout.write(data)
            stdout.flush()
        except (OSError, ValueError):
            pass

    vmm = Vmm(
        instance_id=instance_id, console_output=None if command else write_out,
        command_output=write_out if command else None, virtio_transport=virtio_transport,
        boot_timer=boot_timer, nested=nested,
    )  # fmt: skip
    vmm.mmds_size_limit = mmds_size_limit
    server = None
    try:
        if api_sock is not None:
            try:
                server = ApiServer(vmm, api_sock).start()
            except OSError as err:
                raise UserError(f"--api-sock: {err.strerror or err}") from None
            print(f"{prog}: API on {api_sock}", file=sys.stderr, flush=True)
        vmm.report_start_time(*start_times)  # serving: the start-up Firecracker measures
        boot_now = False
        try:
            if mmds_data is not None:  # `--metadata`: the store's first contents
                try:
                    vmm.put_mmds(mmds_data)
                except ApiError as err:
                    raise UserError(f"--metadata: {err.message}") from None
            if extra_config:
                vmm.apply_config(extra_config)
            if config_file is not None:
                vmm.apply_config(load_config_file(config_file))
                boot_now = True
            if kernel is not None or command:
                boot_now = True
                vmm.put_machine_config({"vcpu_count": vcpus, "mem_size_mib": mem_mib})
                if kernel is not None:
                    source: dict[str, Any] = {"kernel_image_path": str(kernel)}
                    if initrd is not None:
                        source["initrd_path"] = str(initrd)
                    if cmdline is not None:
                        source["boot_args"] = cmdline
                    vmm.put_boot_source(source)
                if command:
                    vmm.set_command(command)
            if boot_now:
                vmm.instance_start()
        except ApiError as err:
            raise UserError(err.message) from None
        if not boot_now and api_sock is None:
            raise UserError("nothing to do: give --api-sock, --config-file, --kernel or a command")
        with _sigterm_as_interrupt():
            deadline = None if timeout is None else time.monotonic() + timeout
            while not vmm.ended.wait(0.5):
                if deadline is not None and time.monotonic() > deadline:
                    if vmm.machine is not None:
                        vmm.machine.stop()
                        vmm.wait(10)
                    print(f"{prog}: timed out after {timeout} s", file=sys.stderr)
                    return 124
        result = vmm.result
        assert result is not None
        if command and result.command_status is not None:
            return result.command_status
        print(f"{prog}: {result.message}", file=sys.stderr)
        if firecracker_exit and result.reason.value in ("poweroff", "reboot"):
            return 0  # Firecracker's FcExitCode::Ok
        return result.exit_status
    finally:
        if server is not None:
            server.close()
        vmm.close()
