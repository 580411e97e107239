"""What Linux says about this machine's CPU (``/proc/cpuinfo``), for choices and reports that depend on it."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The value of the first ``name : value`` line of ``cpuinfo`` (the first CPU's), or None when
    the file or the field is missing (another OS, another architecture)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None
