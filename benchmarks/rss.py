"""Peak resident memory of this process, for run.py's RSS children (Linux /proc; ru_maxrss elsewhere)."""

import resource


def status(key: str) -> float | None:
    """A /proc/self/status field in MiB (VmRSS, VmHWM), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the peak RSS (VmHWM, and so ru_maxrss) to the current RSS: Linux, writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak() -> float:
    """VmHWM, not ru_maxrss: after a vfork/exec, ru_maxrss starts at the *parent's* peak (Linux keeps it in the
    process's signal struct across exec), which would report the benchmark driver's memory."""
    hwm = status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
