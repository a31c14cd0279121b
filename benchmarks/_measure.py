"""Run a command in a fresh Python process and report its wall time and peak resident memory."""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
start = time.perf_counter()
exec(compile(sys.argv[1], "<job>", "exec"))
seconds = time.perf_counter() - start
# VmHWM is this process's own peak: ru_maxrss would include the parent's size at fork time
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mib": int(hwm.split()[1]) / 1024}))
"""


def measure(code: str) -> dict:
    """Wall seconds (inside the process, imports excluded by the job itself) and peak RSS in MiB."""
    out = subprocess.run([sys.executable, "-c", CHILD, code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(measure(sys.argv[1]))
