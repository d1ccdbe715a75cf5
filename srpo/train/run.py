"""The run driver of `srpo train`: steps to `max_steps`, and around them resume, checkpoint
cadence, held-out evaluation, stop signals, the divergence and collapse stops, and the export.

The step itself is `srpo.train.step.Trainer`; every figure and notice goes through one
`MetricsSink`.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch

from srpo.config import TrainConfig
from srpo.runtime.distributed import DistributedContext
from srpo.runtime.precision import DTYPES
from srpo.runtime.seeds import derive_seed
from srpo.train.checkpoint import ensure_export, step_of
from srpo.train.evaluate import (
    EVAL_CSV,
    REWARD_COLUMN,
    EvalLog,
    HeldOutEvaluator,
    RewardHacking,
    collapse_reason,
)
from srpo.train.sink import MetricsSink
from srpo.train.step import Trainer

EXIT_PREEMPTED = 75
"""Exit status after a SIGTERM / SIGUSR1 stop: the step finished and a checkpoint was written
if it fitted in `stop_grace_s`; run the same command again to resume (EX_TEMPFAIL)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_DIVERGED = 3
"""Exit status after `max_bad_steps` updates in a row were skipped for a NaN/Inf."""


class TrainingDiverged(RuntimeError):
    """Too many updates in a row had a NaN/Inf loss or gradient; nothing after them was saved."""


class StopRequested:
    """Remembers a stop signal; the loop acts on it only between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.received_at: float | None = None
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.signal = number
        if self.received_at is None:
            self.received_at = time.monotonic()

    def seconds_left(self, grace: float) -> float:
        """Of the `grace` seconds the launcher waits after the signal before SIGKILL."""
        if self.received_at is None:
            return grace
        return grace - (time.monotonic() - self.received_at)


class HeldOutWatch:
    """When to evaluate, where the figures go, and what the collapse guard concludes."""

    def __init__(self, trainer: Trainer, sink: MetricsSink) -> None:
        config = trainer.config.evaluation
        self.evaluator = HeldOutEvaluator(
            config,
            trainer.ctx,
            trainer.reward,
            trainer.vae,
            trainer.geometry,
            trainer.precision,
            trainer.settings.shift,
            trainer.guidance_embeds,
        )
        self.config = config
        self.max_steps = trainer.config.max_steps
        self.sink = sink
        self.log = EvalLog(trainer.output_dir / EVAL_CSV, trainer.step, sorted(config.metrics))

    def due(self, step: int) -> bool:
        """Step 0 (the base model), every `every` steps and the last; never twice."""
        periodic = step % self.config.every == 0 or step == self.max_steps
        return periodic and not self.log.has(step)

    def __call__(self, model: torch.nn.Module, step: int) -> str | None:
        """Evaluate (collective), log on rank 0, and return the collapse guard's reason."""
        evaluation, seconds = self.evaluator(model, step)
        reason = collapse_reason([*self.log.history, evaluation], self.config.collapse.margins)
        self.log.append(evaluation.row(self.evaluator.total), self.evaluator.ctx.is_main)
        self.sink.scalars(
            step,
            {
                f"eval/{REWARD_COLUMN}": evaluation.reward,
                **{f"eval/{name}": value for name, value in evaluation.metrics.items()},
                "eval/collapse": float(reason is not None),
            },
        )
        scores = " ".join(f"{name}={value:.4f}" for name, value in evaluation.metrics.items())
        self.sink.note(
            f"eval step {step}: {REWARD_COLUMN}={evaluation.reward:.4f} {scores} "
            f"({self.evaluator.total} held-out images, {seconds:.1f}s)"
        )
        if reason is not None:
            self.sink.warn(f"WARNING: reward hacking suspected at step {step}: {reason}")
        return reason


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    export: Path | None
    stopped_by_signal: int | None


def train(config: TrainConfig, resume: bool = True, resume_from: Path | None = None) -> TrainResult:
    """Train to `config.max_steps`, resuming by itself; stop cleanly on SIGTERM / SIGUSR1."""
    stop = StopRequested()
    with DistributedContext.from_environment() as ctx:
        torch.manual_seed(derive_seed(config.seed, "init", ctx.rank))
        trainer = Trainer(config, ctx)
        resumed = trainer.resume(resume_from) if (resume or resume_from) else None
        sink = MetricsSink(
            ctx.is_main, trainer.output_dir, config.max_steps, trainer.step, config.log_every
        )
        if resumed is not None:
            sink.note(f"resumed from {resumed} at step {trainer.step}")
        watch = HeldOutWatch(trainer, sink) if config.evaluation.every else None
        if watch is not None and watch.due(trainer.step):
            watch(trainer.model, trainer.step)
        with sink:
            stopped = _steps(trainer, stop, sink, watch)
        checkpoint = trainer.checkpointer.latest()
        ctx.barrier()
    export = None
    if stopped is None and checkpoint is not None and ctx.is_main:
        export = ensure_export(
            checkpoint,
            config.base_model,
            Path(config.output_dir) / "model",
            DTYPES[config.export_dtype],
        )
    return TrainResult(trainer.step, checkpoint, export, stopped)


def _steps(
    trainer: Trainer, stop: StopRequested, sink: MetricsSink, watch: HeldOutWatch | None
) -> int | None:
    """Steps until `max_steps` or a stop signal (returned); checkpoints on the way."""
    config, ctx = trainer.config, trainer.ctx
    while trainer.step < config.max_steps:
        started = time.perf_counter()
        metrics = trainer.train_step()
        elapsed = time.perf_counter() - started
        if metrics["skipped"]:
            _skipped(trainer, metrics, sink)
        metrics["time/step_s"] = elapsed
        metrics["throughput/samples_per_s"] = config.batch_size / elapsed
        sink.step(trainer.step, metrics, elapsed)
        stop_now = ctx.any(stop.signal is not None)
        periodic = trainer.step % config.checkpoint_every == 0 or trainer.step == config.max_steps
        if periodic or (
            stop_now and trainer.stop_save_fits(stop.seconds_left(config.stop_grace_s))
        ):
            trainer.save()
        elif stop_now:
            sink.warn(
                f"no checkpoint of step {trainer.step}: the last save took "
                f"{trainer.last_save_s:.0f} s, more than is left of stop_grace_s="
                f"{config.stop_grace_s:g}; resume from {trainer.checkpointer.latest()}"
            )
        if stop_now:
            return stop.signal or signal.SIGTERM
        if watch is not None and watch.due(trainer.step):
            reason = watch(trainer.model, trainer.step)
            if reason is not None and config.evaluation.collapse.stop:
                _stop_for_collapse(trainer, reason)
    return None


def _skipped(trainer: Trainer, metrics: dict[str, float], sink: MetricsSink) -> None:
    """A skipped update: say so with its prompts; stop after `max_bad_steps` in a row."""
    limit = trainer.config.max_bad_steps
    step = trainer.step
    values = ", ".join(
        f"{name}={value:.4g}"
        for name, value in sorted(metrics.items())
        if not name.startswith("time/")
    )
    sink.warn(
        f"step {step}: non-finite loss or gradient ({values}); update skipped, "
        f"{trainer.bad_in_row} of max_bad_steps={limit} in a row; prompt numbers "
        f"{trainer.prompt_numbers}"
    )
    if trainer.bad_in_row >= limit:
        latest = trainer.checkpointer.latest()
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint exists"
        raise TrainingDiverged(
            f"training: steps {step - limit + 1}-{step} all had a non-finite loss "
            f"or gradient (max_bad_steps={limit}); stopped without saving, {kept}; lower "
            "optim.learning_rate or use precision: fp32, then resume"
        )


def _stop_for_collapse(trainer: Trainer, reason: str) -> None:
    """`evaluation.collapse.stop`: checkpoint this step (unless just saved), then stop."""
    latest = trainer.checkpointer.latest()
    if trainer.ctx.from_main(latest is None or step_of(latest) != trainer.step):
        latest = trainer.save()
    raise RewardHacking(
        f"training: reward hacking suspected at step {trainer.step}: {reason}; stopped after "
        f"saving {latest} (evaluation.collapse.stop); inspect eval.csv and the samples, then "
        "resume with a smaller learning rate or another reward"
    )
