"""kvmkit.cli."""
