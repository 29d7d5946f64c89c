#!/usr/bin/env bash
# Run the tests marked `hwvirt` (they need VMX/SVM): directly on a host that has hardware
# virtualization (those needing passthrough devices still in a lane), otherwise inside
# `kvmkit lane` boots, one per lane configuration (scripts/hwvirt_tests.py, which also
# resumes the remaining tests in a new lane if the nested KVM wedges the lane).
set -uo pipefail
py=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
impl=$("$py" -c 'from kvmkit.probe import detect_implementation; print(detect_implementation()[0])')
if [[ $impl == hardware-* ]]; then
    echo "hwvirt tests: host KVM is $impl, running them here"
    "$py" -m pytest -m "hwvirt and not lane_devices" tests
    status=$?
    [[ $status == 5 ]] && status=0  # no test selected
    # Tests that need devices behind an IOMMU (marker lane_devices: VFIO with QEMU's edu)
    # run in a lane that has them, here too.
    mkdir -p build
    "$py" scripts/hwvirt_tests.py --lane-devices-only "$py" || status=1
    exit $status
fi

echo "hwvirt tests: host KVM is $impl (no VMX/SVM), running them inside kvmkit lane"
mkdir -p build
exec "$py" scripts/hwvirt_tests.py "$py"
