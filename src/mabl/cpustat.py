"""CPU time stolen by the hypervisor, so that wall-clock figures can be read honestly.

On a virtual machine whose host is oversubscribed, part of the time this machine's cores are
meant to run is given to other guests ("steal" in ``/proc/stat``, the ``st`` column of
``top``). A training run or a speed benchmark then takes longer for reasons that have nothing
to do with the code. :class:`StealMeter` measures the stolen fraction between two reads so runs
(``metrics.jsonl`` rows, ``summary.json``) and benchmarks can report it next to their times, and
a slow run can be told apart from a busy host. (Steal is not the only such cause: a host that
shares physical cores between guests slows them without any steal being counted.)

Linux only; elsewhere (no ``/proc/stat``) every reading is ``None``.
"""
from __future__ import annotations

from pathlib import Path

PROC_STAT = Path("/proc/stat")


def read_cpu_times(path: Path = PROC_STAT) -> tuple[int, int] | None:
    """``(steal, total)`` jiffies of the aggregate ``cpu`` line of ``/proc/stat``, or None.

    ``total`` is user + nice + system + idle + iowait + irq + softirq + steal (guest time is
    already counted inside user/nice by the kernel, so it is not added again)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("cpu "):
                    vals = [int(x) for x in line.split()[1:]]
                    break
            else:
                return None
    except (OSError, ValueError):
        return None
    if len(vals) < 8:  # kernels before 2.6.11 have no steal column
        return None
    return vals[7], sum(vals[:8])


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Fraction of all CPU time between two :func:`read_cpu_times` readings that was stolen."""
    if before is None or after is None:
        return None
    d_total = after[1] - before[1]
    if d_total <= 0:
        return None
    return max(0.0, min(1.0, (after[0] - before[0]) / d_total))


class StealMeter:
    """Steal fraction since construction (:meth:`total`) and since the previous :meth:`lap`."""

    def __init__(self, path: Path = PROC_STAT):
        self.path = path
        self.start = self.last = read_cpu_times(path)

    def lap(self) -> float | None:
        now = read_cpu_times(self.path)
        out = steal_fraction(self.last, now)
        if now is not None:
            self.last = now
        return out

    def total(self) -> float | None:
        return steal_fraction(self.start, read_cpu_times(self.path))
