"""RunLogger: what each backend's real library wrote is read back (W&B's offline run file through W&B's own
protobuf schema, TensorBoard's event files through its EventAccumulator), metrics.jsonl holds the logged
values with tokens/s computed, the loss curve is a real PNG covering every part of a resumed run, ranks
other than 0 write nothing, and W&B never touches the network."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import threading
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from moka_train.training import run_logger as rl
from moka_train.training.run_logger import RunLogger, read_metrics, write_loss_curve

LOGGER_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "logger").glob("*.yaml"))
HAVE_TENSORBOARD = rl.find_spec("tensorboard") is not None
HAVE_MATPLOTLIB = rl.find_spec("matplotlib") is not None


def test_the_logging_packages_are_installed():
    """matplotlib and tensorboard are required dependencies (pyproject.toml): a broken install fails here
    rather than showing only as the skips below, which are for a user's trimmed environment."""
    assert HAVE_MATPLOTLIB and HAVE_TENSORBOARD


def step_metrics(step: int, part: int = 0) -> dict[str, float]:
    """Distinct values per step (and per part of a resumed run); compared exactly, as JSON round-trips floats."""
    return {
        "loss": 4.0 / step + part,
        "lr": 1e-4 * step,
        "tokens": 256 * step,
        "step_time": 0.25 * (1 + step % 2),
        "grad_norm": 0.5 * step,
    }


def assert_valid_png(path: Path) -> None:
    """Signature, every chunk's CRC, IHDR first and IEND last, and image data that is not one flat colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    pos, kinds, idat = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300
    assert len(set(zlib.decompress(idat))) > 10


@pytest.fixture
def spy_plots(monkeypatch):
    """The x data of every line matplotlib draws (when it is installed)."""
    drawn: list[list[int]] = []
    if not HAVE_MATPLOTLIB:
        return drawn
    import matplotlib.axes as axes

    original = axes.Axes.plot

    def plot(self, x, *args, **kwargs):
        drawn.append(list(x))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(axes.Axes, "plot", plot)
    return drawn


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """A loopback listener stands in for the W&B server and for every HTTP(S) proxy: any connection W&B's
    Python side or its Go service tried would land there and be counted. W&B's caches go to tmp_path, the
    working directory is an empty folder, and WANDB_MODE starts at ``online`` so the logger must override it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    attempts: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            attempts.append(conn.getpeername())
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for key in ("WANDB_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(key, url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "not-here"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")  # a regression that goes online fails in seconds, not minutes
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield attempts
    stop.set()
    thread.join()
    server.close()
    assert attempts == [], f"W&B tried the network: {attempts}"
    assert list(cwd.iterdir()) == [], "W&B wrote into the working directory"


def wandb_records(path: Path) -> list:
    """The records of a W&B run file, decoded with W&B's own protobuf schema (wandb 0.31 ships no Python
    reader for its LevelDB-log framing, which this is: a 7-byte file header, then 32 KiB blocks of records
    with a 7-byte header each: CRC, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(records: list) -> dict[int, dict[str, float]]:
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    return history


def logged(logger: RunLogger, steps: range, part: int = 0) -> None:
    for step in steps:
        logger.log(step, step_metrics(step, part))


def test_metrics_jsonl_bar_and_tokens_per_s(tmp_path):
    bar = io.StringIO()
    with RunLogger(tmp_path / "run", total_steps=10, bar_file=bar, smoothing_window=3, rank=0) as logger:
        logged(logger, range(1, 6))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    records = [json.loads(line) for line in lines]
    assert records == logger.history == read_metrics(tmp_path / "run" / "metrics.jsonl")
    for i, record in enumerate(records):
        step = i + 1
        assert record["step"] == step
        assert {k: record[k] for k in step_metrics(step)} == step_metrics(step)
        assert record["tokens_per_s"] == step_metrics(step)["tokens"] / step_metrics(step)["step_time"]
        window = [step_metrics(s) for s in range(max(1, step - 2), step + 1)]
        assert record["tokens_per_s_smooth"] == pytest.approx(
            sum(m["tokens"] for m in window) / sum(m["step_time"] for m in window)
        )
        mean_time = sum(m["step_time"] for m in window) / len(window)
        assert record["eta_s"] == pytest.approx((10 - step) * mean_time)
    text = bar.getvalue()
    assert "train 5/10" in text
    for shown in ("step=5", "loss=0.8000", "lr=5.00e-04", "tok/s=", "eta=00:02"):
        assert shown in text, shown


def test_eta_spreads_the_time_between_steps_over_the_steps_left(tmp_path, monkeypatch):
    """Steps of 1 s, with 4 s more (a validation) before step 2 is logged: from then on the ETA counts 4 s per 2, then
    per 3 steps logged on top of the step time."""
    clock = iter([0.0, 1.0, 6.0, 7.0])  # construction, then each log() call
    monkeypatch.setattr(rl, "time", types.SimpleNamespace(monotonic=lambda: next(clock), time=rl.time.time))
    with RunLogger(tmp_path, total_steps=10, bar=False, smoothing_window=3, rank=0) as logger:
        etas = [logger.log(step, {"step_time": 1.0})["eta_s"] for step in (1, 2, 3)]
    assert etas == pytest.approx([9 * 1.0, 8 * (1.0 + 4 / 2), 7 * (1.0 + 4 / 3)])


def test_numpy_numbers_and_measured_step_time(tmp_path):
    with RunLogger(tmp_path, total_steps=3, bar=False) as logger:
        record = logger.log(1, {"loss": np.float32(2.5), "tokens": np.int64(100)})
        with pytest.raises(TypeError, match="'lr' must be a number"):
            logger.log(2, {"lr": "1e-4"})
    assert record["loss"] == 2.5 and record["tokens"] == 100
    assert record["step_time"] > 0  # measured: the time since the logger was built
    assert record["tokens_per_s"] == pytest.approx(100 / record["step_time"])


def test_nonfinite_loss_is_null_and_steps_must_increase(tmp_path):
    with RunLogger(tmp_path, total_steps=5, bar=False) as logger:
        logger.log(1, {"loss": math.nan, "step_time": 1.0})
        logger.log(2, {"loss": math.inf, "step_time": 1.0})
        for bad in (2, 1):
            with pytest.raises(ValueError, match="steps must increase"):
                logger.log(bad, {"loss": 1.0})
        with pytest.raises(ValueError, match="first argument"):
            logger.log(3, {"step": 3})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [None, None]
    assert "NaN" not in "".join(lines) and "Infinity" not in "".join(lines)


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_loss_curve_png(tmp_path, spy_plots):
    with RunLogger(tmp_path, total_steps=40, bar=False) as logger:
        logged(logger, range(1, 41))
    assert_valid_png(tmp_path / "loss_curve.png")
    assert spy_plots == [list(range(1, 41))] * 3  # raw loss, smoothed loss, lr
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_the_curve_draws_the_validation_loss_where_it_was_measured(tmp_path, spy_plots):
    with RunLogger(tmp_path, total_steps=12, bar=False) as logger:
        for step in range(1, 13):
            logger.log(step, {**step_metrics(step), **({"val_loss": abs(8.0 - step)} if step % 4 == 0 else {})})
    assert_valid_png(tmp_path / "loss_curve.png")
    # loss x 2, val_loss, its lowest (step 8: 0.0), lr
    assert spy_plots == [list(range(1, 13))] * 2 + [[4, 8, 12], [8], list(range(1, 13))]


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_crash_inside_the_context_still_draws_the_curve(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RunLogger(tmp_path, total_steps=10, bar=False) as logger:
        logged(logger, range(1, 4))
        raise RuntimeError("boom")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert_valid_png(tmp_path / "loss_curve.png")


def test_resume_appends_and_the_curve_covers_both_parts(tmp_path, spy_plots):
    run = tmp_path / "run"
    # Part 1 logs steps 1..6 and dies without close(); its last checkpoint was step 4.
    first = RunLogger(run, total_steps=10, bar=False)
    logged(first, range(1, 7), part=0)
    first._metrics_file.close()  # what the kill leaves: every line already flushed
    bar = io.StringIO()
    with RunLogger(run, total_steps=10, initial_step=4, bar_file=bar) as second:
        logged(second, range(5, 11), part=1)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]  # appended, nothing rewritten
    assert [r["step"] for r in second.history] == list(range(5, 11))
    final = read_metrics(run / "metrics.jsonl")
    expected = [(s, step_metrics(s, 0 if s <= 4 else 1)["loss"]) for s in range(1, 11)]
    assert [(r["step"], r["loss"]) for r in final] == expected  # part 1's steps 5, 6 superseded
    if HAVE_MATPLOTLIB:
        assert spy_plots[0] == list(range(1, 11))  # the curve drawn at the end spans both parts
        assert_valid_png(run / "loss_curve.png")
    else:
        assert not (run / "loss_curve.png").exists()
    assert "train 4/10" in bar.getvalue() and "train 10/10" in bar.getvalue()


def test_read_metrics_skips_a_torn_last_line_and_a_fresh_restart_supersedes_all(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3)] + [{"step": s, "loss": -float(s)} for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_metrics(path) == rows[3:]


def test_wandb_offline_run_read_back_resumes_same_id_and_no_network(tmp_path, no_network):
    run = tmp_path / "run"
    config = {"model": {"name": "tiny_llama"}, "adapter": {"method": "moka", "rank": 4}}
    with RunLogger(run, 6, backend="wandb", config=config, project="moka-test", name="unit", bar=False) as logger:
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(run)
        logged(logger, range(1, 4))
    with RunLogger(run, 6, backend="wandb", config=config, project="moka-test", initial_step=3, bar=False) as logger:
        logged(logger, range(4, 7), part=1)
    # finish() returns once the run's exit is acknowledged, which can come before wandb's service process has
    # written its buffered records to run-<id>.wandb; teardown stops the service, closing the files.
    import wandb

    wandb.teardown()

    run_id = (run / "wandb_run_id").read_text().strip()
    # One directory per part, each with the same run id (W&B adds "-1" when both start in the same second).
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(f"-{run_id}" in p.name for p in parts)
    history = {}
    for part in parts:
        records = wandb_records(part / f"run-{run_id}.wandb")
        (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (start.run_id, start.project) == (run_id, "moka-test")
        assert start.telemetry.feature.offline
        logged_config = {u.key: json.loads(u.value_json) for u in start.config.update}
        assert logged_config["model"] == config["model"] and logged_config["adapter"] == config["adapter"]
        history.update(wandb_history(records))
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for step, row in history.items():
        expected = step_metrics(step, part=0 if step <= 3 else 1)
        assert row["train/loss"] == expected["loss"] and row["train/lr"] == expected["lr"]
        assert row["train/tokens_per_s"] == expected["tokens"] / expected["step_time"]
    assert {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()} == set(history)


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="the tensorboard package is not installed")
def test_tensorboard_event_files_read_back_and_resume_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    first = RunLogger(run, 8, backend="tensorboard", config={"seed": 7}, bar=False)
    logged(first, range(1, 6))
    first.close()
    with RunLogger(run, 8, backend="tensorboard", config={"seed": 7}, initial_step=3, bar=False) as second:
        logged(second, range(4, 9), part=1)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(s, step_metrics(s, part=0 if s <= 3 else 1)["loss"]) for s in range(1, 9)]
    assert [s for s, _ in loss] == [s for s, _ in expected]  # steps 4, 5 of the first part were purged
    assert [v for _, v in loss] == pytest.approx([v for _, v in expected])
    rate = {e.step: e.value for e in events.Scalars("train/tokens_per_s")}
    assert rate[2] == pytest.approx(step_metrics(2)["tokens"] / step_metrics(2)["step_time"])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_tensorboard_restart_before_any_checkpoint_purges_the_dead_attempt(tmp_path):
    """A crash before the first checkpoint: resume=auto starts at step 0 again, and TensorBoard shows the new
    attempt's steps only (it used to overlay both attempts' values at steps 1 and 2)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    first = RunLogger(run, 4, backend="tensorboard", bar=False)
    logged(first, range(1, 3))
    first.close(failed=True)
    with RunLogger(run, 4, backend="tensorboard", bar=False) as second:
        logged(second, range(1, 5), part=1)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([step_metrics(s, part=1)["loss"] for s in range(1, 5)])


@pytest.mark.parametrize("backend", ["none", "wandb", ["wandb", "tensorboard"]])
def test_ranks_other_than_0_write_nothing(tmp_path, monkeypatch, backend):
    if "tensorboard" in backend and not HAVE_TENSORBOARD:
        pytest.skip("the tensorboard package is not installed")
    monkeypatch.setenv("WANDB_MODE", "untouched")
    bar = io.StringIO()
    with RunLogger(tmp_path / "run", 5, backend=backend, rank=1, config={"a": 1}, bar_file=bar) as logger:
        assert logger.log(1, step_metrics(1)) == {}
        with pytest.raises(ValueError, match="steps must increase"):  # checked on every rank alike
            logger.log(1, step_metrics(1))
    assert not (tmp_path / "run").exists()
    assert bar.getvalue() == "" and logger.history == []
    assert os.environ["WANDB_MODE"] == "untouched"


def test_rank_from_the_launcher_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert RunLogger(tmp_path / "run", 5).rank == 3
    assert not (tmp_path / "run").exists()


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.backend must be one of .*'mlflow'"):
        RunLogger(tmp_path, 5, backend="mlflow")
    with pytest.raises(ValueError, match=r"logger\.backend"):
        RunLogger(tmp_path, 5, backend=["wandb", "csv"])
    with pytest.raises(ValueError, match=r"logger\.mode must be one of"):
        RunLogger(tmp_path, 5, backend="wandb", wandb_mode="cloud")
    with pytest.raises(ValueError, match="initial_step"):
        RunLogger(tmp_path, 5, initial_step=6)
    with pytest.raises(ValueError, match=r"unknown logger keys \['projcet'\]"):
        RunLogger.from_config({"backend": "wandb", "projcet": "x"}, tmp_path, 5)
    assert list(tmp_path.iterdir()) == []


def test_missing_backend_package_fails_on_every_rank(tmp_path, monkeypatch):
    real = rl.find_spec
    monkeypatch.setattr(rl, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    for rank in (0, 1):
        with pytest.raises(ImportError, match="logger.backend=tensorboard needs the 'tensorboard' package"):
            RunLogger(tmp_path, 5, backend="tensorboard", rank=rank)


def test_no_curve_without_matplotlib_or_loss(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    assert write_loss_curve(path, tmp_path / "a.png") is False
    path.write_text(json.dumps({"step": 1, "loss": 0.1}) + "\n")
    real = rl.find_spec
    monkeypatch.setattr(rl, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert write_loss_curve(path, tmp_path / "b.png") is False
    assert "pip install matplotlib" in caplog.text
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("path", LOGGER_CONFIGS, ids=[p.stem for p in LOGGER_CONFIGS])
def test_logger_presets(tmp_path, path):
    cfg = OmegaConf.load(path)
    assert cfg.backend == path.stem
    if path.stem == "wandb":
        assert (cfg.project, cfg.mode) == ("moka-train", "offline")
        assert "wandb sync" in path.read_text()
    if path.stem == "tensorboard" and not HAVE_TENSORBOARD:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            RunLogger.from_config(cfg, tmp_path, 5, rank=1)
        return
    logger = RunLogger.from_config(cfg, tmp_path / "run", 5, rank=1)  # validated on every rank, built on none
    assert logger.total_steps == 5 and not logger.active
