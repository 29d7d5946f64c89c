"""kvmkit.arch."""
