"""Virtio devices (virtio 1.2): split virtqueues, the device model, the virtio-mmio
transport, and the block and entropy devices. See docs/virtio.md."""
