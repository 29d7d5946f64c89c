"""Device emulation. Devices depend on guest memory, the buses and interrupt lines below,
never on the KVM wrappers: interrupts reach KVM through irqfd (see `irq.py`)."""
