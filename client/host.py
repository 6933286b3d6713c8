"""What this host gives this process: memory it may still use (the machine's available memory,
or less under a memory cgroup's limit: cgroup v1 `memory.limit_in_bytes`, v2 `memory.max`) and
a CPU quota if any (v1 `cpu.cfs_quota_us`, v2 `cpu.max`): how a container or an emulated small
host is capped."""
from __future__ import annotations

import math
import os
from pathlib import Path


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_dirs():
    """(controllers, path) of each line of /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    return [(c.split(","), p.lstrip("/")) for _, c, p in (line.split(":", 2) for line in lines)]


def cpu_quota() -> float | None:
    """Cores this process's CPU cgroup allows (quota / period), or None if unlimited."""
    q = cfs_quota()
    return q[0] / q[1] if q else None


def default_threads() -> int:
    """Kernel threads when none are asked for: one per core this process may run on, but no
    more than its CPU quota rounds up to. Under a quota of 0.25 core, two threads made the
    one-token kernel ~500x slower (6 -> 0.01 GB/s): a parallel loop's threads wait for each
    other, and a throttled one keeps the other waiting for the rest of the period."""
    cores, quota = len(os.sched_getaffinity(0)), cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cfs_quota() -> tuple[int, int] | None:
    """(quota, period) in microseconds of this process's CPU cgroup, or None if unlimited."""
    for controllers, path in _cgroup_dirs():
        if "cpu" in controllers:                                    # cgroup v1
            base = Path("/sys/fs/cgroup/cpu") / path
            quota, period = _read_int(base / "cpu.cfs_quota_us"), _read_int(base / "cpu.cfs_period_us")
            if quota and quota > 0 and period:
                return quota, period
        elif controllers == [""]:                                   # cgroup v2
            try:
                quota, period = (Path("/sys/fs/cgroup") / path / "cpu.max").read_text().split()
            except (OSError, ValueError):
                continue
            if quota != "max":
                return int(quota), int(period)
    return None


def quota_share(quota_us: int, period_us: int, threads: int) -> float | None:
    """The fraction of its threads' time a CFS-capped process may run (quota / period / threads),
    or None when it may run all of it (no quota, or a whole core or more per thread). Such a
    process runs at full speed until it has used the period's quota, then waits for the next
    period: client.model.time_balanced weighs both."""
    if not (quota_us and period_us):
        return None
    frac = quota_us / period_us / max(1, threads)
    return frac if frac < 1 else None


def cgroup_room() -> tuple[int, str] | None:
    """(bytes left under this process's memory cgroup limit, the limit file), if limited. The
    page cache counts as usage in a cgroup but is reclaimed first, so it is not subtracted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):                     # cgroup v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file, stat_file = "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"
            cache_key = "total_cache"
        elif controllers == "":                                    # cgroup v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file, usage_file, stat_file = "memory.max", "memory.current", "memory.stat"
            cache_key = "file"
        else:
            continue
        limit, usage = _read_int(base / limit_file), _read_int(base / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        cache = 0
        try:
            for s in (base / stat_file).read_text().splitlines():
                k, _, v = s.partition(" ")
                if k == cache_key:
                    cache = int(v)
        except (OSError, ValueError):
            pass
        return max(0, limit - usage + cache), str(base / limit_file)
    return None


def available_memory() -> tuple[int, str]:
    """(bytes this process may still allocate, where that figure comes from)."""
    avail = _meminfo("MemAvailable")
    room = cgroup_room()
    if room and room[0] < avail:
        return room[0], f"memory cgroup limit, {room[1]}"
    return avail, "MemAvailable in /proc/meminfo"


def room_for_huge_pages(nbytes: int) -> bool:
    """Whether a node's weights of nbytes go in huge pages (quant.q8_0.Arena: ~7% faster to
    stream a quarter-host's layer): only where the host has twice that available, since on a host
    at its memory limit they made it slower (see Arena)."""
    return available_memory()[0] >= 2 * nbytes


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB': sizes in messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
