"""TUN/TAP ioctls and flags, from <linux/if_tun.h> and <linux/if.h>."""

from __future__ import annotations

import ctypes

from kvmkit.abi.ioctl import IOR, IOW

T = ord("T")
TUNSETIFF = IOW(T, 202, ctypes.c_int)
TUNGETIFF = IOR(T, 210, ctypes.c_uint)
TUNSETOFFLOAD = IOW(T, 208, ctypes.c_uint)
TUNSETVNETHDRSZ = IOW(T, 216, ctypes.c_int)

# ifr_flags for TUNSETIFF
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD: what the tap may hand us (frames with partial checksums, GSO frames)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

IFNAMSIZ = 16
IFREQ_SIZE = 40  # sizeof(struct ifreq) on x86-64

# <linux/sockios.h>, <linux/if.h>: bring an interface up
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
