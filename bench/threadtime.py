"""Where a frame's time goes, per thread, from the kernel's own accounting (no sampler).

For every thread of this process, ``/proc/self/task/<tid>/schedstat`` gives the time it ran,
the time it waited on a run queue for a core (runnable, not running) and how many times it
was put on a core; ``status`` splits its context switches into voluntary (it blocked) and
involuntary (it was preempted). Taken before and after a run and divided by the frames done,
these say which thread costs what, and how often the threads push one another off the two
cores: what a sampling profiler cannot show, since a thread waiting for a core is in no stack.
Python threads are named by ``threading``; the others are the runtime's own (XNNPACK's
workers).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThreadTime:
    run_ns: int
    wait_ns: int  # runnable, waiting for a core
    voluntary: int  # blocked (a lock, a queue, I/O)
    preempted: int


def snapshot() -> dict[str, ThreadTime]:
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, ThreadTime] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            run_ns, wait_ns, _ = (int(x) for x in (task / "schedstat").read_text().split())
            status = (task / "status").read_text().splitlines()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        name = names.get(int(task.name), f"native {task.name}")
        if name == "MainThread":
            name = "main"
        out[name] = ThreadTime(
            run_ns,
            wait_ns,
            int(fields["voluntary_ctxt_switches"]),
            int(fields["nonvoluntary_ctxt_switches"]),
        )
    return out


def per_frame(before: dict[str, ThreadTime], after: dict[str, ThreadTime], frames: int) -> str:
    """One line per thread that ran: us of CPU, us waiting for a core, switches, per frame."""
    zero = ThreadTime(0, 0, 0, 0)
    rows: list[tuple[str, tuple[float, ...]]] = []
    total = [0.0, 0.0, 0.0, 0.0]
    for name, end in after.items():
        start = before.get(name, zero)
        delta = (
            (end.run_ns - start.run_ns) / 1e3 / frames,
            (end.wait_ns - start.wait_ns) / 1e3 / frames,
            (end.voluntary - start.voluntary) / frames,
            (end.preempted - start.preempted) / frames,
        )
        if delta[0] <= 0:
            continue
        total = [t + d for t, d in zip(total, delta, strict=True)]
        rows.append((name, delta))
    rows.sort(key=lambda r: -r[1][0])
    rows.append(("all threads", tuple(total)))
    return "\n".join(
        f"    {name:22s} CPU {d[0]:7.0f} us  waiting for a core {d[1]:5.0f} us  "
        f"blocked {d[2]:4.2f}x  preempted {d[3]:4.2f}x"
        for name, d in rows
    )
