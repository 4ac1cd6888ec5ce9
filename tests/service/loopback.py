"""The network check of the Ray tests: every TCP socket of a process and of the processes it started
is on loopback (``ss -tanp``), so that no test talks to another address of the machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

LOOPBACK = ("127.", "[::1]", "::1", "[::ffff:127.", "::ffff:127.")
ANY_PEER = ("0.0.0.0", "*", "[::]")  # the peer column of a listening socket


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def sockets_off_loopback(pids: set[int], at_least: int = 5) -> list[tuple[str, str]]:
    """(local, peer) of every TCP socket of ``pids`` that is not on loopback; fails when fewer than
    ``at_least`` sockets are seen at all (the check would prove nothing)."""
    lines = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line.split() for line in lines if any(f"pid={pid}," in line for pid in pids)]
    assert len(ours) > at_least, f"only {len(ours)} sockets seen for {len(pids)} processes: the check would prove nothing"
    return [(f[3], f[4]) for f in ours
            if not (f[3].startswith(LOOPBACK) and f[4].startswith(LOOPBACK + ANY_PEER))]
