"""The VM's GSI routing table with MSI routes added at run time (KVM API doc,
KVM_SET_GSI_ROUTING).

KVM_SET_GSI_ROUTING replaces the whole table, so the table is kept here: the routes
KVM_CREATE_IRQCHIP installed (`default_x86_routes`, GSIs 0-23 to the PICs and IOAPIC) plus
one MSI route per allocated GSI (MSI-X vectors, from 24 up). An irqfd on an allocated GSI
delivers whatever message its route holds at that moment; KVM updates irqfds when the
table changes.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from kvmkit.abi import structs
from kvmkit.guestlog import GuestLog
from kvmkit.kvm.errors import KvmError
from kvmkit.kvm.vm import MAX_IRQ_ROUTES, default_x86_routes, route_msi

log = logging.getLogger(__name__)
# Lines a guest can cause, rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

FIRST_MSI_GSI = 24  # after the IOAPIC's 24 pins


class RoutingTarget(Protocol):
    def set_gsi_routing(self, entries: list[structs.kvm_irq_routing_entry]) -> None: ...


class GsiRouter:
    def __init__(self, vm: RoutingTarget | None) -> None:
        self.vm = vm
        self._lock = threading.Lock()
        self._next = FIRST_MSI_GSI
        # gsi -> (address, data); None: allocated, no message programmed yet (no route).
        self.msi: dict[int, tuple[int, int] | None] = {}

    def allocate(self) -> int:
        with self._lock:
            if self._next >= MAX_IRQ_ROUTES:
                raise ValueError("no GSI left for MSI routes")
            gsi = self._next
            self._next += 1
            self.msi[gsi] = None
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route `gsi` to (address, data), values the guest wrote to an MSI-X entry."""
        address &= (1 << 64) - 1
        data &= 0xFFFFFFFF
        with self._lock:
            if gsi not in self.msi or self.msi[gsi] == (address, data):
                return
            self.msi[gsi] = (address, data)
            if not self._commit():
                self.msi[gsi] = None  # drop the message KVM refused, keep the others
                self._commit()

    def routes(self) -> list[structs.kvm_irq_routing_entry]:
        entries = default_x86_routes()
        for gsi, msg in sorted(self.msi.items()):
            # An entry still all zeros is a vector the driver has not programmed: no route,
            # so a stray trigger goes nowhere instead of to an address-0 message.
            if msg is not None and msg != (0, 0):
                entries.append(route_msi(gsi, *msg))
        return entries

    def _commit(self) -> bool:
        if self.vm is None:
            return True
        try:
            self.vm.set_gsi_routing(self.routes())
            return True
        except KvmError as err:
            # KVM refuses some messages (e.g. address_hi bits with the x2APIC API on): the
            # guest's bad entry must not take the VMM down; the vector just stays silent.
            glog.warning("GSI routing rejected (%s); guest MSI-X entry ignored", err)
            return False
