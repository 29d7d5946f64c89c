"""kvmkit: a virtual machine monitor and KVM toolkit written in Python."""

__version__ = "0.1.0"
