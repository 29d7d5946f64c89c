"""The default guest image's /init, a busybox shell script (kept in Python so it ships with
the package; docs/image.md describes it).

It is the guest side of the console protocol in `kvmkit.vmm.console`:

1. mount proc, sysfs, devtmpfs, devpts, tmpfs on /tmp, /run and /dev/shm; set the hostname;
   load the kernel modules listed in /lib/modules/<release>/kvmkit.order (quietly: a module
   that is missing or fails to load is skipped), and those of kvmkit-kvm.order (KVM) when
   /proc/cpuinfo shows svm or vmx (a `--nested` guest);
   with `root=` (/dev/..., PARTUUID=, UUID=, LABEL=; `ro`/`rw`, `rootfstype=`,
   `rootflags=`, `rootwait`, `rootdelay=` as the kernel reads them) wait for that device
   and mount it on /newroot (`ROOT_MOUNT`); without a command, `switch_root` into its
   `/sbin/init` (or `init=`); with one, the command runs in it through chroot;
2. read /proc/cmdline:
   `kvmkit.nonce=<hex>`       marker nonce
   `kvmkit.cmd=<b64url>`      the command: base64url (no `=` padding) of a JSON array of
                              strings, as `kvmkit.vmm.machine._cmdline_quote` writes it
   `kvmkit.panic_test=1`      panic the kernel (sysrq `c`) instead of running anything
   `quiet`                    also lowers the console log level to 1 while the command runs,
                              so kernel messages cannot mix into its output
3. with a command: put /dev/ttyS0 in raw mode, print `KVMKIT-<nonce>-BEGIN\\n`, run the
   command (stdin/stdout/stderr on /dev/ttyS0, cwd /root, HOME=/root,
   PATH=/bin:/sbin:/usr/bin:/usr/sbin), print `\\nKVMKIT-<nonce>-EXIT <status>\\n`, wait for
   the UART to drain and `poweroff -f`.  A `kvmkit.cmd` that does not decode, or decodes to
   an empty array, reports status 127 with a message between the markers;
4. without a command: an interactive shell on the console with job control
   (`setsid cttyhack sh`), then `poweroff -f` when it exits.

The JSON decoder is busybox awk (the image has no other JSON reader): `DECODE_FUNCS` holds
it as the shell function `kvmkit_decode_cmd B64URL`, which prints the argv as single-quoted
shell words for `eval "set -- $words"`.  It handles every JSON string escape, \\uXXXX with
surrogate pairs encoded as UTF-8, and U+DC80..U+DCFF as the raw bytes 0x80..0xFF (Python's
surrogateescape, how undecodable bytes in a str argv travel); a NUL cannot be in an argv and
is refused.  The unit tests run these functions with busybox sh on the host.
"""

from __future__ import annotations

# Converts one JSON array of strings (stdin) into single-quoted shell words (stdout); exits 1
# on anything else.  No single quote inside: the program is a single-quoted shell string.
JSON_ARGV_AWK = r"""
function skip() { while (i <= n && index(" \t\r\n", substr(s, i, 1)) > 0) i++ }
function chr(c) { return sprintf("%c", c) }
function hexval(h,    k, v, d) {
    if (length(h) != 4) return -1
    v = 0
    for (k = 1; k <= 4; k++) {
        d = index("0123456789abcdef", tolower(substr(h, k, 1)))
        if (d == 0) return -1
        v = v * 16 + d - 1
    }
    return v
}
function utf8(c,    r) {
    if (c < 128) return chr(c)
    if (c < 2048) return chr(192 + int(c / 64)) chr(128 + c % 64)
    if (c < 65536) return chr(224 + int(c / 4096)) chr(128 + int(c / 64) % 64) chr(128 + c % 64)
    r = chr(240 + int(c / 262144)) chr(128 + int(c / 4096) % 64)
    return r chr(128 + int(c / 64) % 64) chr(128 + c % 64)
}
function squote(w,    r, k) {
    r = ""
    while ((k = index(w, Q)) > 0) {
        r = r substr(w, 1, k - 1) Q "\\" Q Q
        w = substr(w, k + 1)
    }
    return Q r w Q
}
BEGIN { Q = chr(39); s = "" }
{ s = s $0 "\n" }
END {
    n = length(s); i = 1; out = ""
    skip()
    if (substr(s, i, 1) != "[") exit 1
    i++
    skip()
    if (substr(s, i, 1) == "]") {
        i++
    } else {
        for (;;) {
            skip()
            if (substr(s, i, 1) != "\"") exit 1
            i++
            w = ""
            for (;;) {
                if (i > n) exit 1
                c = substr(s, i, 1)
                i++
                if (c == "\"") break
                if (c != "\\") {
                    if (c == "\n") exit 1
                    w = w c
                    continue
                }
                c = substr(s, i, 1)
                i++
                if (c == "\"" || c == "\\" || c == "/") w = w c
                else if (c == "n") w = w chr(10)
                else if (c == "t") w = w chr(9)
                else if (c == "r") w = w chr(13)
                else if (c == "b") w = w chr(8)
                else if (c == "f") w = w chr(12)
                else if (c == "u") {
                    u = hexval(substr(s, i, 4))
                    i += 4
                    if (u < 0) exit 1
                    if (u >= 55296 && u < 56320 && substr(s, i, 2) == "\\u") {
                        lo = hexval(substr(s, i + 2, 4))
                        if (lo >= 56320 && lo < 57344) {
                            u = 65536 + (u - 55296) * 1024 + (lo - 56320)
                            i += 6
                        }
                    }
                    if (u >= 56448 && u < 56576) w = w chr(u - 56320)
                    else if (u == 0 || (u >= 55296 && u < 57344)) exit 1
                    else w = w utf8(u)
                } else exit 1
            }
            out = out " " squote(w)
            skip()
            c = substr(s, i, 1)
            i++
            if (c == "]") break
            if (c != ",") exit 1
        }
    }
    skip()
    if (i <= n) exit 1
    printf "%s", out
}
"""

DECODE_FUNCS = (
    r"""
KVMKIT_JSON_ARGV_AWK='"""
    + JSON_ARGV_AWK
    + r"""'

# kvmkit_decode_cmd B64URL: print the argv that kvmkit.cmd encodes (base64url without
# padding of a JSON array of strings) as single-quoted words for `eval "set -- $words"`.
kvmkit_decode_cmd() {
    _kvmkit_b=$(printf '%s' "$1" | tr '_-' '/+')
    case $((${#_kvmkit_b} % 4)) in
        1) return 1 ;;
        2) _kvmkit_b="$_kvmkit_b==" ;;
        3) _kvmkit_b="$_kvmkit_b=" ;;
    esac
    _kvmkit_j=$(printf '%s\n' "$_kvmkit_b" | base64 -d 2>/dev/null) || return 1
    printf '%s\n' "$_kvmkit_j" | awk "$KVMKIT_JSON_ARGV_AWK"
}
"""
)

# The input is one string of hex digits, `s`; v(i) is byte i, le(i, n) the little-endian
# number of n bytes at i, lehex(i, n) the same as hex digits (awk's printf %x stops at 2^31).
HEX_AWK = r"""
function v(i,    h, k, d, x) {
    h = substr(s, 2 * i + 1, 2); x = 0
    for (k = 1; k <= 2; k++) { d = index("0123456789abcdef", substr(h, k, 1)); x = x * 16 + d - 1 }
    return x
}
function le(i, n,    x, k) { x = 0; for (k = n - 1; k >= 0; k--) x = x * 256 + v(i + k); return x }
function lehex(i, n,    x, k) {
    x = ""
    for (k = n - 1; k >= 0; k--) x = x substr(s, 2 * (i + k) + 1, 2)
    return x
}
{ s = s $0 }
"""

# Reads the first 1 KiB of a disk as hex (MBR and the GPT header) and prints its
# partitions: "N PARTUUID" for an MBR table, or "gpt LBA COUNT SIZE" (where the GPT entry
# array is) for a GPT one. The PARTUUIDs are Linux's: block/partitions/msdos.c makes
# "%08x-%02x" of the disk signature (bytes 440-443) and the partition number; GPT disks have
# a protective MBR entry of type 0xEE.
PARTTABLE_AWK = HEX_AWK + r"""
END {
    if (length(s) < 2048 || substr(s, 1021, 4) != "55aa") exit 1
    gpt = 0
    for (p = 0; p < 4; p++) if (v(446 + 16 * p + 4) == 238) gpt = 1
    if (gpt) {
        if (substr(s, 1025, 16) != "4546492050415254") exit 1
        cnt = le(512 + 80, 4); size = le(512 + 84, 4)
        if (cnt < 1 || cnt > 256 || size < 128 || size > 512) exit 1
        printf "gpt %d %d %d\n", le(512 + 72, 4), cnt, size
        exit 0
    }
    for (p = 0; p < 4; p++)
        if (v(446 + 16 * p + 4) != 0) printf "%d %s-%02x\n", p + 1, lehex(440, 4), p + 1
}
"""

# Reads a GPT entry array as hex and prints "N GUID" for every used entry: the partition's
# unique GUID (bytes 16-31 of the entry: three little-endian fields, then eight bytes as
# they are, UEFI 2.x "GPT Partition Entry"), which is its PARTUUID in Linux.
GPT_ENTRIES_AWK = HEX_AWK + r"""
END {
    for (e = 0; e < cnt; e++) {
        o = e * size
        if (substr(s, 2 * o + 1, 32) ~ /^0+$/) continue
        g = o + 16
        printf "%d %s-%s-%s-%s-%s\n", e + 1, lehex(g, 4), lehex(g + 4, 2), lehex(g + 6, 2), \
            substr(s, 2 * (g + 8) + 1, 4), substr(s, 2 * (g + 10) + 1, 12)
    }
}
"""

ROOT_FUNCS = (
    r"""
KVMKIT_PARTTABLE_AWK='"""
    + PARTTABLE_AWK
    + r"""'
KVMKIT_GPT_ENTRIES_AWK='"""
    + GPT_ENTRIES_AWK
    + r"""'

# kvmkit_hex FILE OFFSET LENGTH: those bytes as lowercase hex, no spaces.
kvmkit_hex() {
    od -A n -t x1 -v -j "$2" -N "$3" "$1" 2>/dev/null | tr -d ' \n'
}

# kvmkit_partuuids DISK: "N PARTUUID" for each partition of DISK (MBR primary or GPT).
kvmkit_partuuids() {
    _kp=$(kvmkit_hex "$1" 0 1024 | awk "$KVMKIT_PARTTABLE_AWK") || return 1
    case $_kp in
        gpt\ *)
            set -- "$1" $_kp
            kvmkit_hex "$1" $(($3 * 512)) $(($4 * $5)) |
                awk -v cnt="$4" -v size="$5" "$KVMKIT_GPT_ENTRIES_AWK"
            ;;
        *) printf '%s\n' "$_kp" ;;
    esac
}

# kvmkit_find_partuuid UUID: the /dev path of the partition with that PARTUUID (compared
# without regard to case, as Linux does), on any disk; nothing if there is none yet.
kvmkit_find_partuuid() {
    _kw=$(printf '%s' "$1" | tr 'A-F' 'a-f')
    for _kb in /sys/block/*; do
        _kn=${_kb##*/}
        case $_kn in loop*|ram*) continue ;; esac
        [ -b "/dev/$_kn" ] || continue
        kvmkit_partuuids "/dev/$_kn" | while read -r _kno _kuuid; do
            if [ "$_kuuid" = "$_kw" ]; then
                case $_kn in *[0-9]) echo "/dev/${_kn}p$_kno" ;; *) echo "/dev/$_kn$_kno" ;; esac
            fi
        done
    done
}

# kvmkit_root_device SPEC: the device node root= names (/dev/..., PARTUUID=, UUID=,
# LABEL=), or nothing while it has not appeared.
kvmkit_root_device() {
    case $1 in
        PARTUUID=*) _kr=$(kvmkit_find_partuuid "${1#PARTUUID=}" | head -n 1) ;;
        UUID=*|LABEL=*) _kr=$(findfs "$1" 2>/dev/null) ;;
        /dev/*) _kr=$1 ;;
        *) _kr= ;;
    esac
    # The disk may be there before its partitions' nodes are.
    [ -n "$_kr" ] && [ -b "$_kr" ] && echo "$_kr"
}
"""
)

# With root=: wait for the device (the virtio modules probe it in the background), mount it
# at /newroot as the kernel would (read-only unless rw), and either run the command in it
# (kvmkit.cmd, through chroot) or switch_root into its init. A root that does not appear or
# mount is fatal, as it is for the kernel: a message, then a kernel panic.
ROOT_MOUNT = r"""
kvmkit_root_fail() {
    echo "kvmkit-init: $1" > /dev/console
    echo c > /proc/sysrq-trigger
    while :; do sleep 60; done
}

if [ -n "$ROOT" ]; then
    case $ROOTDELAY in ''|*[!0-9]*) ROOTDELAY= ;; esac
    wait_s=${ROOTDELAY:-10}
    [ -n "$ROOTWAIT" ] && wait_s=600
    i=0
    while :; do
        ROOTDEV=$(kvmkit_root_device "$ROOT")
        [ -n "$ROOTDEV" ] && break
        [ $i -ge $((wait_s * 10)) ] && kvmkit_root_fail "root device $ROOT did not appear"
        i=$((i + 1))
        usleep 100000
    done
    opts=rw
    [ -n "$ROOT_RO" ] && opts=ro
    [ -n "$ROOTFLAGS" ] && opts="$opts,$ROOTFLAGS"
    mkdir -p /newroot
    if ! mount ${ROOTFSTYPE:+-t "$ROOTFSTYPE"} -o "$opts" "$ROOTDEV" /newroot; then
        kvmkit_root_fail "cannot mount $ROOTDEV ($ROOT) on /newroot"
    fi
    if [ -n "$HAVE_CMD" ]; then
        for d in proc sys dev; do
            [ -d "/newroot/$d" ] && mount --bind "/$d" "/newroot/$d"
        done
    fi
fi

kvmkit_switch_root() {
    case $NEW_INIT in /*) ;; *) NEW_INIT=/$NEW_INIT ;; esac
    if [ ! -e "/newroot$NEW_INIT" ] && [ ! -L "/newroot$NEW_INIT" ]; then
        kvmkit_root_fail "no $NEW_INIT on the root file system $ROOT"
    fi
    # What the root file system has a place for moves there; the rest goes.
    for d in /dev /proc /sys; do
        if [ -d "/newroot$d" ]; then
            mount --move "$d" "/newroot$d"
        else
            umount -l "$d"
        fi
    done
    umount /tmp /run 2>/dev/null
    exec switch_root /newroot "$NEW_INIT"
}
"""

INIT = (
    r"""#!/bin/sh
# kvmkit default guest image init: see kvmkit/image/guest_init.py and docs/image.md.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
umask 022
"""
    + DECODE_FUNCS
    + ROOT_FUNCS
    + r"""
halt() {
    sync
    if [ -n "$ROOT" ]; then  # the root file system the command ran in, cleanly
        umount /newroot/dev /newroot/sys /newroot/proc 2>/dev/null
        umount /newroot 2>/dev/null || mount -o remount,ro /newroot 2>/dev/null
    fi
    poweroff -f
    while :; do sleep 60; done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname kvmkit
ip link set lo up 2>/dev/null

KVER=$(uname -r)
ORDERS=kvmkit.order
# The CPU shows VMX or SVM only to a --nested guest: then load KVM too (/dev/kvm).
grep -qwE 'svm|vmx' /proc/cpuinfo && ORDERS="$ORDERS kvmkit-kvm.order"
for order in $ORDERS; do
    [ -r "/lib/modules/$KVER/$order" ] || continue
    while read -r mod; do
        [ -n "$mod" ] && insmod "/lib/modules/$KVER/$mod" >/dev/null 2>&1
    done < "/lib/modules/$KVER/$order"
done

NONCE= CMD= HAVE_CMD= PANIC_TEST= QUIET=
ROOT= ROOTFSTYPE= ROOTFLAGS= ROOT_RO=1 ROOTWAIT= ROOTDELAY= NEW_INIT=/sbin/init
read -r CMDLINE < /proc/cmdline
set -f
for word in $CMDLINE; do
    case $word in
        kvmkit.nonce=*) NONCE=${word#*=} ;;
        kvmkit.cmd=*) CMD=${word#*=}; HAVE_CMD=1 ;;
        kvmkit.panic_test=1) PANIC_TEST=1 ;;
        quiet) QUIET=1 ;;
        # The root file system, as the kernel reads these parameters
        # (Documentation/admin-guide/kernel-parameters.txt); read-only unless `rw`.
        root=*) ROOT=${word#root=} ;;
        rootfstype=*) ROOTFSTYPE=${word#*=} ;;
        rootflags=*) ROOTFLAGS=${word#*=} ;;
        ro) ROOT_RO=1 ;;
        rw) ROOT_RO= ;;
        rootwait) ROOTWAIT=1 ;;
        rootdelay=*) ROOTDELAY=${word#*=} ;;
        init=*) NEW_INIT=${word#init=} ;;
    esac
done
set +f
""" + ROOT_MOUNT + r"""
if [ -n "$PANIC_TEST" ]; then
    echo "kvmkit-init: kvmkit.panic_test=1: triggering a kernel panic"
    echo c > /proc/sysrq-trigger
    halt
fi

TTY=/dev/ttyS0
[ -c "$TTY" ] || TTY=/dev/console
cd /root 2>/dev/null || cd /

if [ -n "$ROOT" ] && [ -z "$HAVE_CMD" ]; then
    kvmkit_switch_root  # does not come back
fi

if [ -z "$HAVE_CMD" ]; then
    export PS1='\u@\h:\w\$ '
    setsid cttyhack sh
    stty -F "$TTY" sane 2>/dev/null
    halt
fi

# Raw mode: the command's bytes pass unchanged (no \n -> \r\n, no echo of input).
stty -F "$TTY" raw -echo 2>/dev/null
[ -n "$QUIET" ] && echo 1 > /proc/sys/kernel/printk
if words=$(kvmkit_decode_cmd "$CMD") && [ -n "$words" ]; then
    eval "set -- $words"
    printf 'KVMKIT-%s-BEGIN\n' "$NONCE" > "$TTY"
    if [ -n "$ROOT" ]; then
        # The command runs in the root file system (its programs, its libraries).
        chroot /newroot "$@" < "$TTY" > "$TTY" 2>&1
    else
        (cd /root 2>/dev/null; exec "$@") < "$TTY" > "$TTY" 2>&1
    fi
    status=$?
else
    printf 'KVMKIT-%s-BEGIN\n' "$NONCE" > "$TTY"
    echo "kvmkit-init: kvmkit.cmd does not decode to a command: $CMD" > "$TTY"
    status=127
fi
printf '\nKVMKIT-%s-EXIT %d\n' "$NONCE" "$status" > "$TTY"
# busybox stty sets the modes with TCSADRAIN: it returns once the UART has sent everything.
stty -F "$TTY" raw -echo 2>/dev/null
halt
"""
)
