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


def peak_rows(a: dict, b: dict, label: str, steps: int) -> list[tuple[str, str, str, str]]:
    """Report rows of the two runs' peaks (``peak_all``, ``peak_steps``,
    ``transient``), with what the second removed."""
    def removed(key: str) -> str:
        return "n/a" if a[key] is None or b[key] is None else fmt_mib(a[key] - b[key])

    return [
        (f"{label}, whole run", fmt_mib(a["peak_all"]), fmt_mib(b["peak_all"]),
         removed("peak_all")),
        (f"{label}, steps 2..{steps}", fmt_mib(a["peak_steps"]), fmt_mib(b["peak_steps"]),
         removed("peak_steps")),
        (f"most one step adds, steps 2..{steps}", fmt_mib(a["transient"]),
         fmt_mib(b["transient"]), removed("transient")),
    ]


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """Print report rows under the columns compile, cce and removed."""
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':<{width}}  {'compile':>12}  {'cce':>12}  {'removed':>12}")
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}  {r[3]:>12}")
