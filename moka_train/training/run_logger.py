"""What a training run reports while it runs and leaves behind: a progress bar, a metrics file, an experiment
tracker (W&B or TensorBoard) and a loss-curve PNG, all from rank 0 only.

    <run_dir>/
        metrics.jsonl        one JSON line per step, flushed each step; a resumed run appends
        loss_curve.png       written by ``close()`` from metrics.jsonl, so it covers every part of a resumed run
        wandb/offline-run-<time>-<id>/   ``backend: wandb`` (offline by default; ``wandb sync`` uploads later)
        wandb_run_id         the W&B run id, reused on resume so that every part syncs into the same W&B run
        tensorboard/         ``backend: tensorboard`` event files

Usage in the training loop (every rank calls it; ranks other than 0 do nothing)::

    with RunLogger(run_dir, total_steps, backend="wandb", config=resolved_config, initial_step=start) as run_log:
        for step in range(start + 1, total_steps + 1):
            ...
            run_log.log(step, {"loss": loss, "lr": lr, "tokens": tokens, "step_time": seconds})

Throughput is computed here, not by the caller: ``tokens_per_s = tokens / step_time`` for the step, and a
smoothed value over the last ``smoothing_window`` steps (total tokens over total time, so a slow step weighs
as much as it cost). ``tokens`` should be the count over all ranks when a global throughput is wanted: the
logger runs no collective of its own, so it can never hang a run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from moka_train.checkpoint_io import write_text_atomic

BACKENDS = ("none", "wandb", "tensorboard")
WANDB_MODES = ("offline", "online", "disabled")
# Keys of the Hydra ``logger`` group (configs/logger/*.yaml); anything else there is a typo and is refused.
CONFIG_KEYS = ("backend", "project", "name", "mode", "bar", "smoothing_window")
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss_curve.png"
WANDB_ID_NAME = "wandb_run_id"
# Which package each backend imports, checked on every rank at construction so that a missing package fails
# the whole job at once instead of rank 0 alone (the others would wait at their next collective).
_BACKEND_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}

logger = logging.getLogger(__name__)


def _default_rank() -> int:
    """This process's global rank: from torch.distributed when initialised, else the launcher's ``RANK``."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _as_number(key: str, value: Any) -> int | float:
    """A plain Python number from an int, a float, a numpy scalar or a one-element tensor (``.item()``),
    so callers can pass ``loss.detach()`` and the JSON and backends still get numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return value


def _json_number(value: int | float) -> int | float | None:
    """NaN and inf become null: the file stays strict JSON (jq, pandas with engine="pyarrow") and a
    non-finite loss is still visible as a gap."""
    return value if isinstance(value, int) or math.isfinite(value) else None


def _plain_config(config: Any) -> dict[str, Any]:
    """The run config as plain containers (an OmegaConf ``DictConfig`` is resolved), as the backends want."""
    if config is None:
        return {}
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


class _Backend:
    """One experiment tracker behind ``RunLogger``: receives each step's numbers, closed once."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class _WandbBackend(_Backend):
    """Weights & Biases. Offline by default, writing under ``run_dir/wandb`` and nowhere else: the run is
    uploaded later with ``wandb sync``, so a cluster without internet access (or with a flaky one) never
    slows or breaks training."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        project: str,
        name: str | None,
        mode: str,
        resume: bool,
    ) -> None:
        # Environment variables as well as init arguments: wandb's service process and any other wandb user in
        # this process (an HF integration, a later wandb.init) then see the same mode and directory.
        os.environ["WANDB_MODE"] = mode
        os.environ["WANDB_DIR"] = str(run_dir)
        import wandb

        id_path = run_dir / WANDB_ID_NAME
        run_id = id_path.read_text(encoding="utf-8").strip() if resume and id_path.is_file() else ""
        if not run_id:
            # W&B run ids: lowercase letters and digits (wandb.util has no public generator)
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_text_atomic(id_path, run_id + "\n")
        self.run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            config=config,
            dir=str(run_dir),
            mode=mode,
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _TensorBoardBackend(_Backend):
    """TensorBoard event files under ``run_dir/tensorboard``, for those who keep no W&B account."""

    def __init__(self, run_dir: Path, config: dict[str, Any], initial_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides what the crashed part logged after the checkpoint it resumes from (all
        # of it when the crash came before the first checkpoint, and the run starts at step 0 again).
        purge_step = initial_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        if config:
            # Four-space indent: TensorBoard renders the text as Markdown, and this keeps it a code block.
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), initial_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def check_logger_config(cfg: Mapping[str, Any]) -> None:
    """The Hydra ``logger`` group's values, each error naming its key; run before anything is built (the
    training recipe's config checks) and again by ``RunLogger`` on its arguments. Unknown keys are refused by name so
    that a typo (``projcet``) does not silently log to the default project; a backend's missing package is
    found on every rank alike."""
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown logger keys {unknown}; the logger group accepts {list(CONFIG_KEYS)}")
    backend = cfg.get("backend", "none")
    for b in [backend] if isinstance(backend, str) else list(backend):
        if b not in BACKENDS:
            raise ValueError(f"logger.backend must be one of {BACKENDS} (or a list of them), got {b!r}")
        if b != "none" and find_spec(_BACKEND_PACKAGES[b]) is None:
            raise ImportError(
                f"logger.backend={b} needs the {_BACKEND_PACKAGES[b]!r} package: pip install {_BACKEND_PACKAGES[b]}"
            )
    if cfg.get("mode", "offline") not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {cfg.get('mode')!r}")
    if not isinstance(cfg.get("bar", True), bool):  # bar=flase is a non-empty string, which is truthy
        raise ValueError(f"logger.bar must be true or false, got {cfg.get('bar')!r}")
    window = cfg.get("smoothing_window", 20)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"logger.smoothing_window must be a positive integer, got {window!r}")


class RunLogger:
    """Progress bar, metrics.jsonl, backend(s) and loss curve of one training run; a no-op on ranks other
    than 0, which may call every method all the same (no ``if rank == 0`` in the training loop).

    ``backend`` is ``"none"``, ``"wandb"``, ``"tensorboard"`` or a list of them (both trackers at once).
    ``initial_step`` is the last step a resumed run had completed: the bar starts there, metrics.jsonl is
    appended to, TensorBoard hides the abandoned steps and W&B continues the same run id."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        total_steps: int,
        backend: str | Sequence[str] = "none",
        rank: int | None = None,
        config: Mapping[str, Any] | None = None,
        project: str = "moka-train",
        name: str | None = None,
        wandb_mode: str = "offline",
        initial_step: int = 0,
        bar: bool = True,
        smoothing_window: int = 20,
        bar_file: IO[str] | None = None,
    ) -> None:
        check_logger_config({"backend": backend, "mode": wandb_mode, "bar": bar, "smoothing_window": smoothing_window})
        backends = [b for b in dict.fromkeys([backend] if isinstance(backend, str) else backend) if b != "none"]
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= initial_step <= total_steps:
            raise ValueError(f"initial_step must be in [0, total_steps={total_steps}], got {initial_step}")

        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.rank = _default_rank() if rank is None else rank
        self.active = self.rank == 0
        self.history: list[dict[str, Any]] = []  # this process's records, as written to metrics.jsonl
        self._last_step = initial_step
        self._window: deque[tuple[float, float | None]] = deque(maxlen=smoothing_window)  # (step_time, tokens)
        self._last_time = time.monotonic()
        # Time between steps outside them (validation, checkpoint saves), summed over the steps logged: the ETA
        # spreads it over the steps to come, so a run that validates every N steps is not promised too early an end.
        self._between_steps, self._steps_logged = 0.0, 0
        self._closed = False
        self._backends: list[_Backend] = []
        self._bar = None
        self._metrics_file: IO[str] | None = None
        if not self.active:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:
            plain_config = _plain_config(config)
            for b in backends:
                if b == "wandb":
                    self._backends.append(
                        _WandbBackend(self.run_dir, plain_config, project, name, wandb_mode, resume=initial_step > 0)
                    )
                else:
                    self._backends.append(_TensorBoardBackend(self.run_dir, plain_config, initial_step))
        except BaseException:
            self._close_outputs(failed=True)
            raise
        if bar:
            from tqdm.auto import tqdm

            stream = bar_file if bar_file is not None else sys.stderr
            interactive = hasattr(stream, "isatty") and stream.isatty()
            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc="train",
                unit="step",
                file=stream,
                dynamic_ncols=interactive,
                # A redirected log (SLURM, nohup) gets a line every 30 s instead of ten a second.
                mininterval=0.1 if interactive else 30.0,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% [{elapsed}{postfix}]",
            )

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        run_dir: str | os.PathLike,
        total_steps: int,
        config: Mapping[str, Any] | None = None,
        initial_step: int = 0,
        rank: int | None = None,
    ) -> RunLogger:
        """From the Hydra ``logger`` group (configs/logger/*.yaml); unknown keys are refused by name so that a
        typo (``projcet``) does not silently log to the default project."""
        check_logger_config(cfg)  # the unknown keys (RunLogger checks the values it is given)
        backend = cfg.get("backend", "none")
        if not isinstance(backend, str):
            backend = list(backend)
        return cls(
            run_dir,
            total_steps,
            backend=backend,
            rank=rank,
            config=config,
            project=cfg.get("project") or "moka-train",
            name=cfg.get("name"),
            wandb_mode=cfg.get("mode", "offline"),
            initial_step=initial_step,
            bar=cfg.get("bar", True),
            smoothing_window=cfg.get("smoothing_window", 20),
        )

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    @property
    def curve_path(self) -> Path:
        return self.run_dir / CURVE_NAME

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record one optimizer step: ``loss``, ``lr``, ``tokens`` (tokens processed in the step) and
        ``step_time`` (seconds; measured here as the time since the previous call when absent); any other
        numbers are passed through. Adds ``tokens_per_s``, ``tokens_per_s_smooth`` and ``eta_s`` (the steps left
        times the smoothed step time plus the mean time per step spent between the calls outside ``step_time``:
        validation, checkpoints), then updates the bar, writes a line to metrics.jsonl and sends everything to the
        backend(s).

        Returns the record written (empty on ranks other than 0). Steps must increase, checked on every rank
        so that a wrong loop fails everywhere alike."""
        if step <= self._last_step:
            raise ValueError(f"logged steps must increase: step {step} after step {self._last_step}")
        if "step" in metrics:
            raise ValueError("the step is log()'s first argument, not a metric")
        if self._closed:
            raise RuntimeError("RunLogger.log after close()")
        now = time.monotonic()
        measured, self._last_time = now - self._last_time, now
        self._last_step = step
        if not self.active:
            return {}

        values = {key: _as_number(key, value) for key, value in metrics.items()}
        step_time = float(values.setdefault("step_time", measured))
        tokens = values.get("tokens")
        self._window.append((step_time, None if tokens is None else float(tokens)))
        if tokens is not None and step_time > 0:
            values["tokens_per_s"] = tokens / step_time
        window_tokens = [t for _, t in self._window if t is not None]
        window_time = sum(s for s, t in self._window if t is not None)
        if window_tokens and window_time > 0:
            values["tokens_per_s_smooth"] = sum(window_tokens) / window_time
        mean_step_time = sum(s for s, _ in self._window) / len(self._window)
        self._between_steps += max(measured - step_time, 0.0)
        self._steps_logged += 1
        per_step = mean_step_time + self._between_steps / self._steps_logged
        values["eta_s"] = max(self.total_steps - step, 0) * per_step

        record = {"step": step, **{k: _json_number(v) for k, v in values.items()}, "wall_time": time.time()}
        self.history.append(record)
        assert self._metrics_file is not None
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()
        for backend in self._backends:
            backend.log(step, values)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(step, values), refresh=False)
            self._bar.update(step - self._bar.n)
        return record

    def _postfix(self, step: int, values: Mapping[str, float]) -> str:
        from tqdm import tqdm

        parts = [f"step={step}"]
        if "loss" in values:
            parts.append(f"loss={values['loss']:.4f}")
        if "lr" in values:
            parts.append(f"lr={values['lr']:.2e}")
        rate = values.get("tokens_per_s_smooth", values.get("tokens_per_s"))
        if rate is not None:
            parts.append(f"tok/s={tqdm.format_sizeof(rate)}")
        parts.append(f"eta={tqdm.format_interval(values['eta_s'])}")
        return " ".join(parts)  # tqdm puts ", " before it

    def close(self, failed: bool = False) -> None:
        """Close the bar and the backend(s) (a failed run is marked so in W&B), then draw loss_curve.png from
        metrics.jsonl. Idempotent; also run by the context manager, with ``failed`` set on an exception, so a
        crashed run still gets its curve."""
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        self._close_outputs(failed)
        try:
            write_loss_curve(self.metrics_path, self.curve_path)
        except Exception:  # the curve is a convenience; never let it turn a finished run into a failed one
            logger.warning("could not draw %s", self.curve_path, exc_info=True)

    def _close_outputs(self, failed: bool) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for backend in self._backends:
            backend.close(failed)
        self._backends = []
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of metrics.jsonl as the run finally saw them, in step order.

    The file is append-only, so a resumed run leaves behind what the crashed part logged after its last
    checkpoint. Such records are dropped: whenever a step is not greater than the one before it (a restart),
    every earlier record at or after that step is superseded. A torn last line (a kill mid-write) is skipped."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if records and record["step"] <= records[-1]["step"]:
                records = [r for r in records if r["step"] < record["step"]]
            records.append(record)
    return records


def _trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it, ignoring NaN (skipped, non-finite steps)."""
    out, kept = [], deque(maxlen=window)
    for v in values:
        kept.append(v)
        finite = [x for x in kept if not math.isnan(x)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def write_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> bool:
    """Loss against step (raw and a trailing mean), the validation loss where there is one (``val_loss``, its
    lowest starred), learning rate on a twin axis, as a PNG. Drawn with
    matplotlib's Agg canvas directly, not pyplot, so no global backend is switched and no display is needed.

    Returns False (after a warning) when there is nothing to draw or matplotlib is not installed."""
    records = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    rows = [r for r in records if "loss" in r]
    if not rows:
        logger.warning("no loss in %s; %s not drawn", metrics_path, png_path)
        return False
    if find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed; %s not drawn (pip install matplotlib)", png_path)
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    loss = [math.nan if r["loss"] is None else float(r["loss"]) for r in rows]
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    window = max(2, min(50, len(loss) // 10))
    axis.plot(steps, _trailing_mean(loss, window), color="tab:blue", linewidth=2, label=f"loss (mean of {window})")
    validated = [r for r in records if r.get("val_loss") is not None]
    if validated:
        axis.plot(
            [r["step"] for r in validated],
            [float(r["val_loss"]) for r in validated],
            color="tab:green",
            marker="o",
            markersize=4,
            linewidth=1.5,
            label="validation loss",
        )
        finite = [r for r in validated if math.isfinite(float(r["val_loss"]))]
        if finite:  # the step whose trainables validation.keep_best keeps
            lowest = min(finite, key=lambda r: float(r["val_loss"]))
            axis.plot(
                [lowest["step"]],
                [float(lowest["val_loss"])],
                color="tab:green",
                marker="*",
                markersize=14,
                linestyle="none",
                label=f"lowest validation loss: {float(lowest['val_loss']):.4g} (step {lowest['step']})",
            )
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    lr_rows = [r for r in rows if r.get("lr") is not None]
    if lr_rows:
        lr_axis = axis.twinx()
        lr_axis.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="tab:orange", label="lr")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more_handles, more_labels = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels, loc="upper right")
    axis.set_title(title or f"{Path(metrics_path).parent.name}: steps {steps[0]}-{steps[-1]}")
    # Drawn beside the target, then renamed: a kill mid-draw never leaves a truncated PNG (and, unlike a
    # mkstemp file, it gets the usual permissions).
    png = Path(png_path)
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return True
