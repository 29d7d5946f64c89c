"""Guest memory: regions (anonymous, memfd, file), bounds-checked access, dirty tracking."""

from kvmkit.memory.guest import GuestMemory
from kvmkit.memory.region import (
    PAGE_SIZE,
    GuestMemoryError,
    HugePagesError,
    MemoryRegion,
    anonymous_region,
    file_region,
    memfd_region,
)

__all__ = [
    "PAGE_SIZE",
    "GuestMemory",
    "GuestMemoryError",
    "HugePagesError",
    "MemoryRegion",
    "anonymous_region",
    "file_region",
    "memfd_region",
]
