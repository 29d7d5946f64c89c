"""kvmkit.image."""
