"""Fuzz target: the JSON bodies of every REST route and of the --config-file (the action
layer behind kvmkit.api.server.Router: the OpenAPI schema checks, the id rules, each
route's own checks and state rules, InstanceStart's and snapshot load's validation of the
whole configuration). Only ApiError (a 4xx with a fault message) may come out.

Input: requests separated by NUL bytes, each `METHOD TARGET` (or `CONFIG`), a newline, and
the body; they go to one fresh Vmm in order, so that later requests see what earlier ones
configured."""

from __future__ import annotations

import json

from api_common import FuzzVmm

from kvmkit.api.actions import ApiError
from kvmkit.api.server import Router


def TestOneInput(data: bytes) -> None:
    vmm = FuzzVmm()
    router = Router(vmm)
    try:
        for request in data.split(b"\0")[:16]:
            line, _, body = request.partition(b"\n")
            method, _, target = line.decode("latin-1").strip().partition(" ")
            if method == "CONFIG":
                try:
                    config = json.loads(body.decode("utf-8", "replace"))
                except (ValueError, RecursionError):
                    continue  # not JSON: the CLI refuses the file before the Vmm sees it
                try:
                    vmm.apply_config(config)
                except ApiError:
                    pass
                continue
            router.handle(method, target or "/", body)
    finally:
        vmm.close()
