#!/usr/bin/env bash
# The README's main job: probe this host's KVM, then boot the default Linux guest and run a
# command in it. Where the host has no VMX/SVM, say so and do the same inside `kvmkit lane`.
set -euo pipefail
cd "$(dirname "$0")/.."
kvmkit=.venv/bin/kvmkit
"$kvmkit" probe --no-speed
echo
impl=$(.venv/bin/python -c 'from kvmkit.probe import detect_implementation; print(detect_implementation()[0])')
if [[ $impl == hardware-* ]]; then
    echo "== kvmkit run -- uname -a"
    "$kvmkit" run -- uname -a
else
    echo "== this host's KVM is $impl: no VMX/SVM, so Linux guests run inside kvmkit lane"
    echo "== kvmkit lane -- kvmkit run --vcpus 2 -- sh -c 'uname -a; nproc'"
    "$kvmkit" lane -- "$PWD/$kvmkit" run --vcpus 2 -- sh -c 'uname -a; nproc'
fi
