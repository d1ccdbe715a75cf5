"""Where a training run's figures and notices go: one sink for TensorBoard, the progress bar
and the log lines.

Only rank 0 writes; on the other ranks every call is a no-op, so the driver calls it
unconditionally. Off a terminal (a Slurm log) the bar is replaced by one line per step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

SUMMARY = ("reward/denoise", "reward/inversion", "grad_norm")
"""The step figures shown beside the bar (and on each plain line)."""


class MetricsSink:
    """TensorBoard scalars every `log_every` steps, the progress bar, stdout and stderr lines."""

    def __init__(
        self, enabled: bool, output_dir: Path, total: int, completed: int, log_every: int
    ) -> None:
        self.enabled = enabled
        self.total = total
        self.log_every = log_every
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        self.progress = Progress(
            TextColumn("[bold]SRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=completed, metrics="")

    def __enter__(self) -> MetricsSink:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, traceback)
        if self.writer is not None:
            self.writer.close()

    def note(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def warn(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def step(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """A finished train step: its scalars (every `log_every`), the bar or a plain line."""
        if step % self.log_every == 0:
            self.scalars(step, metrics)
        summary = " ".join(f"{name.split('/')[-1]}={metrics[name]:.4f}" for name in SUMMARY)
        self.progress.update(self.task, completed=step, metrics=summary)
        if not self.progress.console.is_terminal:
            self.note(f"step {step}/{self.total} {summary} {seconds:.2f}s")
