"""Firecracker's `/balloon` and `/balloon/statistics` (its docs/ballooning.md and
`BalloonConfigError` messages), for the action layer (`kvmkit.api.actions`).

Pre-boot, `PUT /balloon` stores the body (a target larger than guest memory, or a balloon
with huge pages, is refused as Firecracker refuses it); `GET /balloon` answers it. After
boot, the device (`kvmkit.devices.virtio.balloon`) is the truth: `GET /balloon` shows its
current target, `PATCH /balloon` moves it, `GET/PATCH /balloon/statistics` read the guest's
latest statistics and change their interval (statistics cannot be turned on or off after
boot). The device code is imported only when a machine exists.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmkit.api.actions import Vmm
    from kvmkit.api.resources import Resources
    from kvmkit.devices.virtio.balloon import VirtioBalloon
    from kvmkit.vmm.machine import Machine

# Firecracker's messages (vmm_config/balloon.rs BalloonConfigError, VmConfigError).
NOT_FOUND = "No balloon device found."
TOO_LARGE = "Amount of pages requested is too large."
NOT_ACTIVE = "Device is inactive, check if balloon driver is enabled in guest kernel."
STATS_CHANGE = "Cannot enable/disable the statistics after boot."
NO_STATS = "Statistics for the balloon device are not enabled"
HUGE_PAGES = "Firecracker's huge pages support is incompatible with memory ballooning."
MEM_SMALLER = (
    "The memory size (MiB) is smaller than the previously set balloon device target size."
)


def _error(message: str) -> Exception:
    from kvmkit.api.actions import ApiError

    return ApiError(message)


def put(res: Resources, body: dict[str, Any]) -> None:
    """PUT /balloon (pre-boot)."""
    for feature in ("free_page_hinting", "free_page_reporting"):
        if body.get(feature):
            raise _error(f"{feature}: kvmkit's balloon has no free page hinting or reporting "
                         "(set it false or leave it out)")  # fmt: skip
    if body["amount_mib"] > res.machine["mem_size_mib"]:
        raise _error(TOO_LARGE)
    if res.machine.get("huge_pages", "None") != "None":
        raise _error(HUGE_PAGES)
    res.balloon = {"amount_mib": body["amount_mib"], "deflate_on_oom": body["deflate_on_oom"],
                   "stats_polling_interval_s": body.get("stats_polling_interval_s", 0)}  # fmt: skip


def check_machine_config(res: Resources, cfg: dict[str, Any]) -> None:
    """PUT/PATCH /machine-config with a balloon configured: the memory must hold its target,
    and huge pages cannot be used."""
    if res.balloon is None:
        return
    if cfg["mem_size_mib"] < res.balloon["amount_mib"]:
        raise _error(MEM_SMALLER)
    if cfg.get("huge_pages", "None") != "None":
        raise _error(HUGE_PAGES)


def device(machine: Machine | None) -> VirtioBalloon | None:
    if machine is None:
        return None
    from kvmkit.devices.virtio.balloon import VirtioBalloon

    return next((d for _, _, d in machine.virtio if isinstance(d, VirtioBalloon)), None)


def from_machine(machine: Machine) -> dict[str, Any] | None:
    """The /balloon configuration of a machine built elsewhere (a snapshot loaded)."""
    dev = device(machine)
    if dev is None:
        return None
    return _describe(dev)


def _describe(dev: VirtioBalloon) -> dict[str, Any]:
    from kvmkit.devices.virtio.balloon import PAGES_PER_MIB

    return {"amount_mib": dev.num_pages // PAGES_PER_MIB, "deflate_on_oom": dev.deflate_on_oom,
            "stats_polling_interval_s": dev.stats_interval}  # fmt: skip


def config(vmm: Vmm) -> dict[str, Any] | None:
    """The balloon as GET /balloon shows it (None: none configured)."""
    dev = device(vmm.machine)
    return _describe(dev) if dev is not None else copy.deepcopy(vmm.res.balloon)


def get(vmm: Vmm) -> dict[str, Any]:
    out = config(vmm)
    if out is None:
        raise _error(NOT_FOUND)
    return out


def _running_device(vmm: Vmm) -> VirtioBalloon:
    from kvmkit.api.actions import NOT_BEFORE_START, State

    if vmm.state is State.NOT_STARTED:
        raise _error(NOT_BEFORE_START)
    dev = device(vmm.machine)
    if dev is None:
        raise _error(NOT_FOUND)
    return dev


def patch(vmm: Vmm, body: dict[str, Any]) -> None:
    """PATCH /balloon: a new target for the running guest."""
    dev = _running_device(vmm)
    if body["amount_mib"] > vmm.res.machine["mem_size_mib"]:
        raise _error(TOO_LARGE)
    if not dev.activated:
        raise _error(NOT_ACTIVE)
    dev.set_target(body["amount_mib"])
    if vmm.res.balloon is not None:
        vmm.res.balloon["amount_mib"] = body["amount_mib"]


def patch_statistics(vmm: Vmm, body: dict[str, Any]) -> None:
    """PATCH /balloon/statistics: the polling interval; on stays on, off stays off."""
    dev = _running_device(vmm)
    interval = body["stats_polling_interval_s"]
    if (interval > 0) != dev.stats_enabled:
        raise _error(STATS_CHANGE)
    if not dev.activated:
        raise _error(NOT_ACTIVE)
    dev.set_stats_interval(interval)
    if vmm.res.balloon is not None:
        vmm.res.balloon["stats_polling_interval_s"] = interval


def statistics(vmm: Vmm) -> dict[str, Any]:
    """GET /balloon/statistics (post-boot, statistics enabled)."""
    dev = _running_device(vmm)
    if not dev.stats_enabled:
        raise _error(NO_STATS)
    return dev.statistics()
