"""kvmkit.arch.x86_64."""
