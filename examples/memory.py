"""Peak-memory readings the examples share: this process's resident set on Linux."""

from __future__ import annotations

import sys

MiB = 1024 * 1024


def rss_bytes(field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` of this process from /proc (Linux), in bytes.

    VmHWM rather than ru_maxrss after a reset: ru_maxrss also keeps the peak
    of any thread that has exited since.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux only), so one step's peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    """The process's peak resident set since it started, in bytes."""
    import resource  # Unix only

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def fmt_mib(b: float | None) -> str:
    """``b`` bytes as MiB for the reports, or n/a."""
    return "n/a" if b is None else f"{b / MiB:,.1f} MiB"
