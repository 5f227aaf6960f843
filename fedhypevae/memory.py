"""How much memory a new allocation can get, and the refusal when a planned one cannot fit.

Sizes are checked before anything large is allocated (a data file's declared array shapes, a stage's
working set): a blow-up would otherwise swap the machine for minutes or be killed without a message.
The figure is the smaller of what the kernel says is available (MemAvailable) and what this process may
still map under its address-space limit (RLIMIT_AS, e.g. `ulimit -v` or a batch system's memory limit).
"""

from __future__ import annotations

import resource

from .errors import FedHypeVAEError

GB = 1024**3


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _address_space_left() -> int | None:
    """Bytes this process may still map under RLIMIT_AS (None: unlimited or unknown)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return max(0, soft - used)


def available_memory() -> int | None:
    """Bytes a new allocation can get, or None where nothing is known."""
    figures = [v for v in (_meminfo_available(), _address_space_left()) if v is not None]
    return min(figures) if figures else None


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1024**2:.0f} MB"


def check_fits(need: int, what: str, *, advice: str, error=FedHypeVAEError, available: int | None = None) -> None:
    """Refuse, with both figures, an allocation of `need` bytes that cannot fit. `what` names the culprit
    (a file and its array, a stage and the setting that sizes it); `advice` says what to change."""
    avail = available if available is not None else available_memory()
    if avail is not None and need > avail:
        raise error(f"{what} needs about {gb(need)} of memory, more than the {gb(avail)} available; {advice}")
