"""Peak host memory of this process: VmHWM, reset through ``/proc/self/clear_refs``.

Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) resets the peak resident set size
to the current one, so ``peak() - current()`` after an operation is the extra memory it
needed at its worst moment: staging copies, encode buffers, thread stacks. Page cache is not
counted (it is not the process's memory). Threads share the process's counters, so work
done by pool threads is included; work done in other processes (DCP's process-based async
mode, which this benchmark does not use) would not be.
"""

from __future__ import annotations


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current() -> int:
    """Resident set size now, bytes."""
    return _status_kib("VmRSS") * 1024


def peak() -> int:
    """Peak resident set size since the last reset, bytes."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset the peak to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
