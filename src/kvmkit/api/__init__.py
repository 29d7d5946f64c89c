"""kvmkit's Firecracker-compatible API: the action layer (`Vmm`), its REST server on a Unix
socket (`ApiServer`), kvmkit's own OpenAPI spec (`schema.spec()`, shipped as
kvmkit/api/openapi.json) and a client (`client.request`). See docs/api.md."""

from kvmkit.api.actions import ApiError, State, Vmm

__all__ = ["ApiError", "State", "Vmm"]
