"""kvmkit.lane."""
