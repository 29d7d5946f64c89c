#!/usr/bin/env bash
# Host set-up for kvmkit, idempotent: the Debian packages the lane and the tests need, then the
# lane's kernel and initramfs in kvmkit's cache ($KVMKIT_CACHE or ~/.cache/kvmkit).
#   qemu-system-x86  runs the lane VM (QEMU/TCG with emulated AMD-V)
#   busybox-static   the lane initramfs's shell and tools
#   cpio             GNU cpio, which the unit tests use to check kvmkit's cpio writer
#   acpica-tools     iasl, which the unit tests use to check kvmkit's ACPI tables
#   gcc binutils make linux-libc-dev   tiny guests (as, ld, gcc) and the ABI test (linux/kvm.h)
#   e2fsprogs        mkfs.ext4, e2fsck and debugfs: the ext4-on-virtio-blk lane test makes and
#                    checks its image on the host (not Essential: minimal containers lack it)
#   iproute2         `ip` (netns, taps, addresses): `kvmkit net setup` and the net/vsock tests
#   libseccomp2      the library behind pyseccomp: the VMM's seccomp filters (docs/security.md)
#   strace           lists a VMM's system calls to regenerate those filters (scripts/seccomp_profile.py)
# The lane kernel (Debian's linux-image-<abi>-amd64-unsigned) is fetched with `apt-get download`
# and unpacked into the cache, never installed. Needs root (or sudo) only to install packages;
# only the package registries need to be reachable.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 busybox-static cpio acpica-tools gcc binutils make linux-libc-dev e2fsprogs iproute2 libseccomp2 strace)

say() { echo "setup-host: $*"; }

as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        say "need root to run: $*" >&2
        exit 1
    fi
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

apt_knows() {
    local candidate
    candidate=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p')
    [[ -n $candidate && $candidate != "(none)" ]]
}

if ! command -v apt-get >/dev/null; then
    say "apt-get not found: kvmkit's set-up expects a Debian-based host (Debian 12)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

# Refresh the package lists only when something we need is unknown to apt (a fresh machine
# or container often has none), not on every run.
need_update=no
for pkg in "${missing[@]}" linux-image-amd64; do
    apt_knows "$pkg" || need_update=yes
done
if [[ $need_update == yes ]]; then
    say "apt-get update (package lists missing or stale)"
    as_root apt-get update -q
fi

if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "packages already installed: ${PACKAGES[*]}"
fi

# kvmkit itself: the project's venv when `make` made one, else the source tree.
if [[ -x .venv/bin/python ]]; then
    py=(.venv/bin/python)
else
    py=(env "PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python3)
fi
say "preparing the lane kernel and initramfs (kvmkit lane --prepare)"
"${py[@]}" -m kvmkit lane --prepare
say "done"
