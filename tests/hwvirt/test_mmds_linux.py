"""The MMDS as a Firecracker user meets it, through `kvmkit-firecracker --api-sock` only
(needs VMX/SVM: runs in the lane, with `--module tun` for the interface's tap).

One guest boot for every case: the default kernel and initrd, a root file system made by the
test (busybox and an /sbin/init script), one interface on a tap in a network namespace this
test creates, `/mmds/config` naming it with V2 and a store put before boot. The guest gives
eth0 an address (the MMDS answers the source address of the guest's packets, which Linux
must accept on eth0) and a route to 169.254.169.254, then, with busybox: a GET without a
token is refused (401); `nc` sends `PUT /latest/api/token`; `wget --header
"X-metadata-token: ..."` reads a value (IMDS text), an object as JSON with `Accept:
application/json` and an object's listing as text; a wrong token is refused; then the
host PATCHes the store and the guest's next fetch sees the new value. The guest reboots:
the process exits 0.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_firecracker_dropin_linux import BOOT_ARGS, PROLOGUE, Firecracker

from kvmkit.image.guest import default_image
from kvmkit.testing import disks
from kvmkit.testing.netns import temp_netns

pytestmark = pytest.mark.hwvirt

MMDS = "http://169.254.169.254"
INIT = (
    PROLOGUE
    + r"""
ip addr add 172.16.0.2/24 dev eth0; ip link set eth0 up
ip route add 169.254.169.254 dev eth0
get() { timeout 60 wget -q -O - "$@" 2>&1; }
out=$(get MMDS/latest/meta-data/ami-id); echo "FCT NOTOKEN $? $out"
token=$( (printf 'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n';
          sleep 3) | timeout 60 nc 169.254.169.254 80 | tail -n 1)
echo "FCT TOKEN ${#token}"
auth="X-metadata-token: $token"
out=$(get --header "$auth" MMDS/latest/meta-data/ami-id); echo "FCT VALUE $? $out"
out=$(get --header "$auth" --header "Accept: application/json" MMDS/latest/meta-data/placement)
echo "FCT JSON $? $out"
out=$(get --header "$auth" MMDS/latest/meta-data/ | tr '\n' ,); echo "FCT LIST $out"
out=$(get --header "X-metadata-token: wrong" MMDS/latest/meta-data/ami-id); echo "FCT BAD $? $out"
echo "FCT WAIT"
i=0
while [ "$(get --header "$auth" MMDS/latest/meta-data/ami-id)" = ami-1 ] && [ $i -lt 300 ]; do
    usleep 200000; i=$((i + 1))
done
out=$(get --header "$auth" MMDS/latest/meta-data/ami-id); echo "FCT PATCHED $? $out"
echo "FCT DONE"
reboot -f
""".replace("MMDS/", MMDS + "/")
)
STORE = {"latest": {"meta-data": {"ami-id": "ami-1", "placement": {"zone": "z1"},
                                  "hostname": "guest-1"}}}  # fmt: skip


@pytest.fixture
def netns() -> Iterator[str]:
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("no /dev/net/tun: run the lane with `--module tun`")
    with temp_netns() as name:
        yield name


def test_guest_reads_mmds_v2_with_busybox(tmp_path: Path, netns: str) -> None:
    started = time.monotonic()
    image = default_image()
    tree = disks.busybox_tree(tmp_path / "tree", INIT)
    rootfs = tmp_path / "rootfs.ext4"
    disks.ext4(rootfs, tree, 32)
    fc = Firecracker(tmp_path, netns)
    try:
        fc.put("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256})
        fc.put("PUT", "/boot-source", {"kernel_image_path": str(image.kernel),
                                       "initrd_path": str(image.initrd),
                                       "boot_args": BOOT_ARGS})  # fmt: skip
        fc.put("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(rootfs),
                                         "is_root_device": True, "is_read_only": False})
        # The tap: created by kvmkit in the test's namespace (the process runs there).
        fc.put("PUT", "/network-interfaces/eth0", {"iface_id": "eth0",
                                                   "host_dev_name": "mmdstap0"})  # fmt: skip
        fc.put("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})
        fc.put("PUT", "/mmds", STORE)
        fc.put("PUT", "/actions", {"action_type": "InstanceStart"})

        fc.expect("INIT")
        rc, text = fc.expect("NOTOKEN").split(" ", 1)
        assert rc != "0" and "401" in text, fc.why()  # busybox: "server returned error"
        assert int(fc.expect("TOKEN")) > 20, fc.why()
        assert fc.expect("VALUE") == "0 ami-1", fc.why()
        rc, text = fc.expect("JSON").split(" ", 1)
        assert rc == "0" and json.loads(text) == {"zone": "z1"}, fc.why()
        assert fc.expect("LIST") == "ami-id,placement/,hostname", fc.why()
        rc, text = fc.expect("BAD").split(" ", 1)
        assert rc != "0" and "401" in text, fc.why()
        fc.expect("WAIT")
        fc.put("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-2"}}})
        assert fc.expect("PATCHED") == "0 ami-2", fc.why()
        fc.expect("DONE")
        assert fc.proc.wait(300) == 0, fc.why()
    finally:
        fc.close()
    print(f"mmds lane test: {time.monotonic() - started:.1f} s")
