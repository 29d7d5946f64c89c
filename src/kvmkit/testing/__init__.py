"""Tiny guests and the ucall channel, for tests, examples and benchmarks."""

from kvmkit.testing.tinyguest import TinyGuest, ToolchainError
from kvmkit.testing.ucall import GuestAssertionError, GuestError, GuestOutput, GuestTimeout

__all__ = [
    "GuestAssertionError",
    "GuestError",
    "GuestOutput",
    "GuestTimeout",
    "TinyGuest",
    "ToolchainError",
]
