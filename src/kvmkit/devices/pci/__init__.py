"""PCI: configuration mechanism #1, a bus-0 root with a host bridge, type-0 functions with
BARs served from the PCI MMIO window, and MSI-X (see docs/virtio.md, "virtio-pci")."""
