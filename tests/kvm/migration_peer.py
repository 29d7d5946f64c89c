"""The destination process of the bare-VM migration tests (tests/kvm/test_migration_bare.py):

    python migration_peer.py ADDRESS [--run S] [--counter GPA] [--die-after-pages N]
                             [--refuse-state]

Listens at ADDRESS, receives one bare VM (kvmkit.migration.bare), and prints JSON lines:
"listening"; after the migration, before any guest code ran here, its memory's SHA-256 and
vCPU registers; then it runs the guest S seconds and reports the u64 at GPA (a counter the
guest keeps) and the port-0x2100 ticks with their times since the vCPU started here.
--die-after-pages N: the process kills itself after N pages arrived (a destination that
dies mid-stream). --refuse-state: the destination refuses the final state (as it would a
state it cannot use), after the source paused its guest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from kvmkit.kvm import IoExit, Kvm, VmExit
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.migration import bare, stream
from kvmkit.migration.stream import bound_address, listen, parse_address
from kvmkit.snapshot.format import SnapshotError
from kvmkit.vmm.vcpu import VcpuRunner

TICK_PORT = 0x2100


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--run", type=float, default=0.5)
    p.add_argument("--counter", type=lambda s: int(s, 0), default=None)
    p.add_argument("--die-after-pages", type=int, default=None)
    p.add_argument("--refuse-state", action="store_true")
    args = p.parse_args()
    install_kick_handler()

    if args.die_after_pages is not None:
        apply = stream.PageSink.apply

        def dying_apply(self: stream.PageSink, payload: bytearray, peer: str) -> None:
            apply(self, payload, peer)
            if self.pages + self.zero_pages >= args.die_after_pages:
                os._exit(9)

        stream.PageSink.apply = dying_apply  # type: ignore[method-assign]
    if args.refuse_state:

        def refuse(self: bare.BareSink, payload: dict[str, object]) -> object:
            raise SnapshotError("the test's destination refuses this state")

        bare.BareSink.check = refuse  # type: ignore[method-assign, assignment]

    address = parse_address(args.address)
    listener = listen(address)
    say(event="listening", address=str(bound_address(listener, address)))
    with Kvm() as kvm:
        try:
            restored = bare.receive_bare(listener, kvm, accept_timeout=120)
        except stream.MigrationError as err:
            say(event="refused", error=str(err))
            return 2
        digest = hashlib.sha256()
        for region in restored.mem.regions:
            digest.update(region.mapping[:])
        vcpu = restored.vcpus[0]
        say(event="received", mem_sha256=digest.hexdigest(), regs=bytes(vcpu.get_regs()).hex(),
            sregs=bytes(vcpu.get_sregs()).hex(),
            lapic=None if restored.state.vcpus[0].lapic is None
            else restored.state.vcpus[0].lapic.hex())  # fmt: skip
        ticks: list[tuple[float, int]] = []
        t0 = time.monotonic()

        def on_exit(exit_: VmExit) -> bool:
            if isinstance(exit_, IoExit) and exit_.port == TICK_PORT:
                ticks.append((time.monotonic() - t0, exit_.value))
                return True
            say(event="unexpected-exit", exit=exit_.describe())
            return False

        restored.resume()
        runner = VcpuRunner(vcpu, on_exit)
        t0 = time.monotonic()
        runner.start()
        time.sleep(args.run)
        runner.pause()
        counter = None if args.counter is None else restored.mem.read_u64(args.counter)
        runner.stop()
        restored.close()
    say(event="ran", counter=counter, ticks=ticks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
