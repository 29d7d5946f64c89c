#!/usr/bin/env bash
# Run the tests marked `hwvirt` (they need VMX/SVM): directly on a host that has hardware
# virtualization, otherwise inside `kvmkit lane`, in one lane boot for all of them.
set -euo pipefail
py=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
impl=$("$py" -c 'from kvmkit.probe import detect_implementation; print(detect_implementation()[0])')
status=0
if [[ $impl == hardware-* ]]; then
    echo "hwvirt tests: host KVM is $impl, running them here"
    "$py" -m pytest -m hwvirt tests || status=$?
else
    echo "hwvirt tests: host KVM is $impl (no VMX/SVM), running them inside kvmkit lane"
    "$py" -m kvmkit lane --timeout 3000 -- "$PWD/$py" -m pytest -m hwvirt tests || status=$?
fi
# pytest exits 5 when no test was selected: not a failure of this step.
if [[ $status == 5 ]]; then status=0; fi
exit $status
