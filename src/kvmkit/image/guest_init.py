"""The default guest image's /init, a busybox shell script (kept in Python so it ships with
the package; docs/image.md describes it).

It is the guest side of the console protocol in `kvmkit.vmm.console`:

1. mount proc, sysfs, devtmpfs, devpts, tmpfs on /tmp, /run and /dev/shm; set the hostname;
   load the kernel modules listed in /lib/modules/<release>/kvmkit.order (quietly: a module
   that is missing or fails to load is skipped), and those of kvmkit-kvm.order (KVM) when
   /proc/cpuinfo shows svm or vmx (a `--nested` guest);
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

INIT = (
    r"""#!/bin/sh
# kvmkit default guest image init: see kvmkit/image/guest_init.py and docs/image.md.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
umask 022
"""
    + DECODE_FUNCS
    + r"""
halt() {
    sync
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
read -r CMDLINE < /proc/cmdline
set -f
for word in $CMDLINE; do
    case $word in
        kvmkit.nonce=*) NONCE=${word#*=} ;;
        kvmkit.cmd=*) CMD=${word#*=}; HAVE_CMD=1 ;;
        kvmkit.panic_test=1) PANIC_TEST=1 ;;
        quiet) QUIET=1 ;;
    esac
done
set +f

if [ -n "$PANIC_TEST" ]; then
    echo "kvmkit-init: kvmkit.panic_test=1: triggering a kernel panic"
    echo c > /proc/sysrq-trigger
    halt
fi

TTY=/dev/ttyS0
[ -c "$TTY" ] || TTY=/dev/console
cd /root 2>/dev/null || cd /

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
    (cd /root 2>/dev/null; exec "$@") < "$TTY" > "$TTY" 2>&1
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
