"""The lane VM's /init, a busybox shell script (kept in Python so it ships with the package).

Stage 1 runs from the initramfs: mount proc/sys/dev, load the modules in order, find the
virtio-serial ports by name, mount the host root read-only over 9p with tmpfs scratch and the
writable shares on top, copy busybox and this script into the new root's /run, and
`switch_root` there (a real root, not a chroot, so tools that pivot_root or inspect mounts
behave as on the host).  Stage 2 is PID 1 in the host's root: it runs the command with stdout
and stderr on their own ports, reports `exit STATUS OUT_BYTES ERR_BYTES` on the control port
and powers off once the host acknowledges it has received that many bytes.

Progress markers (`kvmkit-lane: stage NAME` / `kvmkit-lane: fail CAUSE DETAIL`) go to the
kernel console, which the host always reads, because failures before virtio-serial exists
can only be reported there.

The per-run settings come from /kvmkit/run.sh, in a second cpio archive appended to the
cached initramfs; it defines three shell functions (written by runner.run_script):
  kvmkit_shares   calls `share TAG PATH` for each writable share
  kvmkit_vfio     calls `bind_vfio BDF` (or PORT/DEVFN) for each passthrough device
                  (--device)
  kvmkit_command  runs the command with the caller's environment (via `env -i`)
"""

from __future__ import annotations

MARKER = "kvmkit-lane:"

INIT = r"""#!/bin/sh
# kvmkit lane init; see kvmkit/lane/init_script.py for the protocol.
mark() { echo "kvmkit-lane: $*"; }
halt() { /bin/busybox sync; /bin/busybox poweroff -f; while :; do /bin/busybox sleep 60; done; }

if [ "$1" != stage2 ]; then
    BB=/bin/busybox
    die() { mark "fail $*"; halt; }
    mark stage init
    $BB mount -t proc proc /proc || die mount proc
    $BB mount -t sysfs sysfs /sys || die mount sysfs
    $BB mount -t devtmpfs devtmpfs /dev || die mount devtmpfs
    . /kvmkit/run.sh

    mark stage modules
    while read -r mod; do
        [ -n "$mod" ] || continue
        if ! out=$($BB insmod "/modules/$mod.ko" 2>&1); then
            die module "$mod: $out"
        fi
    done < /modules/order

    # Ports appear asynchronously after virtio_console loads (the host announces them over
    # the control queue), so wait for them; generously, since TCG may share a busy CPU.
    mark stage ports
    OUT= ERR= CTL=
    tries=0
    while :; do
        for p in /sys/class/virtio-ports/vport*; do
            [ -r "$p/name" ] || continue
            name=$($BB cat "$p/name")
            dev=/dev/${p##*/}
            [ -c "$dev" ] || continue
            case "$name" in
                kvmkit.stdout) OUT=$dev ;;
                kvmkit.stderr) ERR=$dev ;;
                kvmkit.control) CTL=$dev ;;
            esac
        done
        [ -n "$OUT" ] && [ -n "$ERR" ] && [ -n "$CTL" ] && break
        tries=$((tries + 1))
        [ "$tries" -lt 1200 ] || die ports "virtio-serial ports did not appear"
        $BB sleep 0.1
    done

    mark stage mount
    NR=/newroot
    $BB mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose \
        hostroot $NR || die 9p "/: cannot mount the host root (tag hostroot)"
    for d in proc sys dev; do
        $BB mount --move /$d $NR/$d || die mount "move /$d"
    done
    $BB mkdir -p $NR/dev/pts $NR/dev/shm
    $BB mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts $NR/dev/pts \
        || die mount devpts
    $BB mount -t tmpfs -o mode=1777 tmpfs $NR/dev/shm || die mount /dev/shm
    $BB mount -t tmpfs -o mode=0755 tmpfs $NR/run || die mount /run
    for d in /tmp /var/tmp; do
        $BB mount -t tmpfs -o mode=1777 tmpfs $NR$d || die mount "$d"
    done
    $BB mount -t debugfs debugfs $NR/sys/kernel/debug 2>/dev/null
    share() {
        # The mount point may be missing from the host root only when it lies in a tmpfs
        # mounted above (e.g. a directory under /tmp): create it there.
        [ -d "$NR$2" ] || $BB mkdir -p "$NR$2" 2>/dev/null
        $BB mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap \
            "$1" "$NR$2" || die 9p "$2: cannot mount the writable share (tag $1)"
    }
    kvmkit_shares

    $BB mkdir -p $NR/run/kvmkit
    $BB cp /bin/busybox /init /kvmkit/run.sh $NR/run/kvmkit/ || die mount "copy to /run/kvmkit"
    mark stage switch
    exec $BB switch_root $NR /run/kvmkit/busybox sh /run/kvmkit/init stage2 "$OUT" "$ERR" "$CTL"
    die switch "switch_root failed"
fi

# Stage 2: PID 1 in the host's root filesystem.
BB=/run/kvmkit/busybox
OUT=$2 ERR=$3 CTL=$4
. /run/kvmkit/run.sh
sent() {
    # bytes_sent counts what the guest queued on the port: the host waits for that many bytes
    # before acknowledging, so no output is lost to the power-off.
    n=$($BB sed -n 's/^bytes_sent: //p' "/sys/kernel/debug/virtio-ports/${1##*/}" 2>/dev/null)
    echo "${n:--}"
}
exec 3>"$OUT" 4>"$ERR" 5<>"$CTL"
# The loopback interface starts DOWN in a fresh kernel: without it anything on 127.0.0.1 (a
# gdb stub, a TCP migration, a test server) fails with "Network is unreachable".
$BB ip link set lo up || mark "fail net lo: cannot bring the loopback interface up"
bind_vfio() {
    # Give the device to vfio-pci (Documentation/driver-api/vfio.rst): whatever driver has
    # it lets go, driver_override names the one that may take it, drivers_probe binds it.
    # $1 is a BDF, or PORT/DEVFN for a device behind a root port (runner.lane_devices): the
    # function DEVFN of the port's secondary bus, whose number the kernel chose; its sysfs
    # directory is inside the port's.
    b=$1
    case $1 in */*)
        b=
        for f in /sys/bus/pci/devices/${1%/*}/0000:*:${1#*/}; do [ -e "$f" ] && b=${f##*/}; done
        ;;
    esac
    d=/sys/bus/pci/devices/$b
    if [ -z "$b" ] || [ ! -e "$d" ]; then
        echo "kvmkit lane: --device $1: no such PCI device" >&4
        return
    fi
    [ -e "$d/driver" ] && echo "$b" > "$d/driver/unbind"
    echo vfio-pci > "$d/driver_override"
    echo "$b" > /sys/bus/pci/drivers_probe
    g=$($BB readlink "$d/iommu_group" 2>/dev/null)
    [ -n "$g" ] && [ -e "/dev/vfio/${g##*/}" ] ||
        echo "kvmkit lane: --device $1: not bound to vfio-pci (no /dev/vfio/${g##*/})" >&4
}
kvmkit_vfio
mark stage run
echo ready >&5
kvmkit_command </dev/null >&3 2>&4 3>&- 4>&- 5>&-
status=$?
echo "exit $status $(sent "$OUT") $(sent "$ERR")" >&5
read -r ack <&5
halt
"""
