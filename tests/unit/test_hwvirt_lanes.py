"""scripts/hwvirt_tests.py's grouping of the hwvirt tests by the lane they need: what makes
`make test` (CI) run the VFIO tests in a lane booted with their passthrough devices, and the
other hwvirt tests in the default lane without an emulated IOMMU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hwvirt_tests() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hwvirt_tests", REPO / "scripts/hwvirt_tests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_vfio_tests_get_a_lane_of_their_own(hwvirt_tests: ModuleType) -> None:
    groups = hwvirt_tests.collect(
        sys.executable, ("tests/hwvirt/test_vfio_linux.py", "tests/hwvirt/test_linux_boot.py")
    )
    default = hwvirt_tests.LaneConfig()
    assert next(iter(groups)) == default, "the default lane runs first"
    assert groups[default] and all("test_linux_boot.py::" in i for i in groups[default])
    (vfio,) = [lane for lane in groups if lane != default]
    assert sorted(groups[vfio]) == [
        "tests/hwvirt/test_vfio_linux.py::test_edu_passthrough_to_linux",
        "tests/hwvirt/test_vfio_linux.py::test_failed_start_releases_every_vfio_fd",
        "tests/hwvirt/test_vfio_linux.py::test_refusals_are_one_line",
    ]
    assert vfio.devices[0] == "edu" and "uio_pci_generic" in vfio.modules
    # The lane command for that group boots with the devices and modules, and runs only
    # its tests.
    argv = hwvirt_tests.lane_argv(".venv/bin/python", groups[vfio], vfio)
    sep = argv.index("--")
    lane_opts, command = argv[:sep], argv[sep + 1 :]
    assert lane_opts[:4] == [".venv/bin/python", "-m", "kvmkit", "lane"]
    for device in vfio.devices:
        assert lane_opts[lane_opts.index(device) - 1] == "--device"
    assert lane_opts[lane_opts.index("uio_pci_generic") - 1] == "--module"
    assert command[0] == str(REPO / ".venv/bin/python")
    assert command[-3:] == groups[vfio]
    # The default lane gets no --device (no emulated IOMMU slowing its DMA).
    assert "--device" not in hwvirt_tests.lane_argv(".venv/bin/python", groups[default], default)


def test_the_tests_are_spread_by_whole_files_over_the_lanes(hwvirt_tests: ModuleType) -> None:
    boot = "tests/hwvirt/test_linux_boot.py"
    ids = [f"{boot}::a", "tests/hwvirt/test_x.py::b", f"{boot}::c", "tests/hwvirt/test_y.py::d"]
    vfio_ids = ["tests/hwvirt/test_vfio_linux.py::e"]
    default = hwvirt_tests.LaneConfig()
    vfio = hwvirt_tests.LaneConfig(("edu",), ("vfio_pci",))
    workers = hwvirt_tests.plan({default: ids, vfio: vfio_ids}, 2)
    # Two lanes side by side: the heaviest file (test_linux_boot.py) alone on one; the
    # other, lighter files and the VFIO group on the other, one lane boot each, default first;
    # a file's tests together and in their original order.
    assert sorted(workers, key=len) == [
        [(default, [f"{boot}::a", f"{boot}::c"])],
        [(default, ["tests/hwvirt/test_x.py::b", "tests/hwvirt/test_y.py::d"]), (vfio, vfio_ids)],
    ]
    # One lane: everything in one worker, a lane boot per group.
    assert hwvirt_tests.plan({default: ids, vfio: vfio_ids}, 1) == [
        [(default, ids), (vfio, vfio_ids)]
    ]
