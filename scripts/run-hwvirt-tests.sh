#!/usr/bin/env bash
# Run the tests marked `hwvirt` (they need VMX/SVM): directly on a host that has hardware
# virtualization, otherwise inside `kvmkit lane`.
#
# In the lane each test gets its own lane boot with its own time limit, and a lane that hits
# its limit is booted once more for that test. The nested KVM under QEMU/TCG was seen to
# wedge now and then (the whole lane goes idle mid-boot of an L2 guest, no timeout inside it
# fires); with one lane for everything one wedge cost the whole run. Each boot adds ~15 s.
set -uo pipefail
py=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
impl=$("$py" -c 'from kvmkit.probe import detect_implementation; print(detect_implementation()[0])')
if [[ $impl == hardware-* ]]; then
    echo "hwvirt tests: host KVM is $impl, running them here"
    "$py" -m pytest -m hwvirt tests
    status=$?
    [[ $status == 5 ]] && status=0  # no test selected
    exit $status
fi

echo "hwvirt tests: host KVM is $impl (no VMX/SVM), running them inside kvmkit lane"
mapfile -t ids < <("$py" -m pytest -p no:cacheprovider -m hwvirt --collect-only -q tests \
    | grep '::')
passed=0 failed=0 wedged=0
failures=()
for id in "${ids[@]}"; do
    limit=900
    [[ $id == *megabytes* ]] && limit=2700
    for attempt in 1 2; do
        "$py" -m kvmkit lane --timeout "$limit" -- "$PWD/$py" -m pytest -p no:cacheprovider \
            -q -rxX "$id"
        rc=$?
        if [[ $rc == 124 && $attempt == 1 ]]; then
            echo "hwvirt tests: the lane hit its ${limit}s limit on $id; booting it once more"
            wedged=$((wedged + 1))
            continue
        fi
        break
    done
    if [[ $rc == 0 ]]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$id (status $rc)")
    fi
done
echo "hwvirt tests: ${#ids[@]} run in the lane, $wedged lane(s) retried after a wedge"
for f in "${failures[@]}"; do echo "FAILED $f"; done
echo "hwvirt: $passed passed, $failed failed"
[[ $failed == 0 ]]
