"""Progress display for long work: one bar over all blocks (vision, projector, language)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class BlockProgress:
    """Callable `(label, advance)`; the calibrator reports each finished block."""

    def __init__(self, console: Console, total: int | None = None) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), console=console, transient=False, disable=not console.is_terminal)
        self.task = None
        self.total = total
        self.console = console

    def set_total(self, total: int) -> None:
        self.total = total

    def __call__(self, label: str, advance: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("calibrating", total=self.total)
        self.progress.update(self.task, advance=advance, description=f"calibrating {label}")
        if not self.console.is_terminal:
            self.console.print(f"calibrated {label}", highlight=False)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
