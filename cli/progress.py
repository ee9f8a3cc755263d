"""Progress on stderr for the long commands: transient rich bars, so stdout stays the result.

`ProgressBar` owns the bar; `StageProgress` (one bar per stage of `ProgressEvent`s) and
`TrainProgress` (`TrainEvent`s) render what their library reports; `parity_progress` renders a
parity check's `ProgressEvent`s. rich is imported only when one is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from bnexport.progress import ProgressEvent


class ProgressBar:
    """A transient rich progress bar on stderr with `columns` (rich column objects); off when
    stderr is not a terminal (a log would only get the blank line the bar leaves)."""

    def __init__(self, *columns: Any) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self.err = Console(stderr=True, highlight=False)
        self.bar = Progress(
            *columns, console=self.err, transient=True, disable=not self.err.is_terminal
        )

    def __enter__(self) -> ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)


class StageProgress(ProgressBar):
    """Renders `ProgressEvent`s: one bar per stage."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        super().__init__(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: ProgressEvent) -> None:
        task = self.tasks.get(event.stage)
        if task is None:
            task = self.tasks[event.stage] = self.bar.add_task(event.stage, total=event.total)
        self.bar.update(
            task,
            completed=event.done,
            total=event.total,
            description=f"{event.stage}: {event.message}",
        )


class TrainProgress(ProgressBar):
    """Renders `TrainEvent`s: a bar with running loss/accuracy, a line per epoch."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().__init__(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.task: Any = None

    def __call__(self, event: Any) -> None:
        label = f"{event.epoch}/{event.epochs}"
        if self.task is None:
            self.task = self.bar.add_task(
                "train", total=event.steps, epoch=label, loss=0.0, acc=0.0
            )
        if event.kind == "step":
            if event.step == 1:
                self.bar.reset(self.task, total=event.steps)
            self.bar.update(
                self.task, completed=event.step, epoch=label, loss=event.loss, acc=event.acc
            )
        else:
            self.bar.console.print(
                f"epoch {label}  train loss {event.loss:.4f}  acc {event.acc:.2%}  "
                f"test loss {event.test_loss:.4f}  acc {event.test_acc:.2%}"
            )


@contextlib.contextmanager
def parity_progress() -> Iterator[Callable[[ProgressEvent], None] | None]:
    """Progress of the parity check on stderr: a rich bar on a terminal, else one line per run."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    err = Console(stderr=True)
    if not err.is_terminal:

        def line(event: ProgressEvent) -> None:
            typer.echo(f"parity [{event.done}/{event.total}] {event.message}", err=True)

        yield line
        return
    with Progress(
        TextColumn("Checking parity: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def update(event: ProgressEvent) -> None:
            bar.update(task, description=event.message, completed=event.done, total=event.total)

        yield update
