"""Raw KVM bindings: ioctl numbers, ctypes structures and constants. No logic, no kvmkit imports
beyond this package (python-ptrace / pyroute2 style)."""

from kvmkit.abi import constants, ioctls, structs
from kvmkit.abi.constants import Cap, ExitReason

__all__ = ["Cap", "ExitReason", "constants", "ioctls", "structs"]
