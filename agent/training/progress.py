"""How the training steps say how far they are: one ``Stage`` callback, named per step.

The command line draws a progress bar per name; the Python API passes ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

Stage = Callable[[str, int, int], None]  # (step name, done, total)
Step = Callable[[int, int], None]  # (done, total) of one named step


def step_of(stage: Stage | None, name: str) -> Step | None:
    """``stage`` bound to the step ``name`` (None stays None)."""
    if stage is None:
        return None

    def progress(done: int, total: int) -> None:
        stage(name, done, total)

    return progress


def report(stage: Stage | None, name: str, done: int, total: int) -> None:
    if stage is not None:
        stage(name, done, total)
