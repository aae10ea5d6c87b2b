"""The partial-modality table: each run's score with the adapter path kept for some tokens only.

The paper evaluates trained models with the adapter applied to the text tokens only, or to the non-text tokens
only, to show that a shared LoRA learns little on the media tokens (dropping their path barely moves its score)
while MokA's media path carries part of the answer. scripts/partial_modality.py answers the benchmark once per
adapter path and gives the scores to ``PartialModalityTable``, which writes them as Markdown, CSV and a bar chart.

Column names (``adapter_paths`` in configs/partial_modality.yaml): ``all`` (every token: the normal model),
``none`` (no token: the frozen backbone with the trained projectors), a modality (``text``, ``visual``, ...),
``media`` (every non-text modality of the run's adapter), or several joined by ``+`` (``text+audio``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moka_train.modality import Modality

ALL, NONE, MEDIA = "all", "none", "media"
NOT_AVAILABLE = "n/a"  # a column whose modalities the run's adapter has no path for


class AdapterPathError(ValueError):
    """A column name that names no adapter path."""


def check_path_name(name: str) -> str:
    """``name`` if it is a column name (see the module docstring), else an AdapterPathError naming the choices."""
    if name in (ALL, NONE, MEDIA):
        return name
    for part in name.split("+"):
        try:
            Modality.parse(part)
        except ValueError:
            known = ", ".join(m.key for m in Modality if m is not Modality.PAD)
            raise AdapterPathError(
                f"adapter path {name!r}: {part!r} is no modality; use {ALL}, {NONE}, {MEDIA}, a modality ({known}) "
                "or modalities joined by +"
            ) from None
    return name


def resolve_path(name: str, configured: Sequence[str]) -> list[str] | None:
    """The modalities whose tokens keep the adapter path for column ``name``, given the adapter's ``configured``
    modalities: None for ``all`` (the whole adapter), a list otherwise. A KeyError when the adapter has no path
    for one of them (the column is n/a for that run)."""
    check_path_name(name)
    if name == ALL:
        return None
    if name == NONE:
        return []
    if name == MEDIA:
        return [m for m in configured if m != Modality.TEXT.key]
    wanted = sorted({Modality.parse(part).key for part in name.split("+")})
    missing = [m for m in wanted if m not in configured]
    if missing:
        raise KeyError(f"the adapter has no path for {missing} (its modalities: {list(configured)})")
    return wanted


@dataclass
class RunRow:
    """One run's scores, by column; None where the column is n/a for it."""

    label: str
    run_dir: str
    scores: dict[str, float | None] = field(default_factory=dict)

    def delta(self, column: str) -> float | None:
        """The column's score minus the whole adapter's (``all``), when both exist."""
        score, full = self.scores.get(column), self.scores.get(ALL)
        return None if score is None or full is None else score - full


@dataclass
class PartialModalityTable:
    benchmark: str
    metric: str  # BenchmarkScore.main_name, e.g. "accuracy"
    mode: str
    columns: list[str]
    rows: list[RunRow] = field(default_factory=list)

    def markdown(self) -> str:
        """A table: one row per run, one column per adapter path, each cell with its change from ``all``."""
        lines = [
            f"### Partial-modality inference: {self.benchmark} {self.metric} ({self.mode} rule)",
            "",
            "Adapter path kept only for the tokens named by the column; every other token sees the frozen W0 "
            f"alone. In brackets: the change from `{ALL}`. {NOT_AVAILABLE}: the run's adapter has no such path.",
            "",
            "| run | " + " | ".join(f"`{c}`" for c in self.columns) + " |",
            "|---|" + "---:|" * len(self.columns),
        ]
        for row in self.rows:
            cells = []
            for column in self.columns:
                score, delta = row.scores.get(column), row.delta(column)
                if score is None:
                    cells.append(NOT_AVAILABLE)
                elif column == ALL or delta is None:
                    cells.append(f"{score:.2f}")
                else:
                    cells.append(f"{score:.2f} ({delta:+.2f})")
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["run", "run_dir", "benchmark", "mode", "metric", "adapter_path", "score", "delta_vs_all"])
        for row in self.rows:
            for column in self.columns:
                score, delta = row.scores.get(column), row.delta(column)
                writer.writerow(
                    [row.label, row.run_dir, self.benchmark, self.mode, self.metric, column]
                    + ["" if v is None else f"{v:.4f}" for v in (score, delta)]
                )
        return buffer.getvalue()

    def plot(self, path: Path) -> None:
        """Grouped bars: adapter paths along x, one bar per run."""
        # The object API on the Agg canvas: no pyplot state, no display; imported here (about a second).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        width = max(4.5, 0.5 * len(self.columns) * max(len(self.rows), 1) + 1.5)
        figure = Figure(figsize=(width, 3.6))
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        bar = 0.8 / max(len(self.rows), 1)
        xs = range(len(self.columns))
        for number, row in enumerate(self.rows):
            values = [math.nan if row.scores.get(c) is None else row.scores[c] for c in self.columns]
            offset = (number - (len(self.rows) - 1) / 2) * bar
            ax.bar([x + offset for x in xs], values, bar, label=row.label)
            for x, value in zip(xs, values, strict=True):
                if math.isnan(value):
                    ax.text(x + offset, 0, NOT_AVAILABLE, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(list(xs), self.columns)
        ax.set_xlabel("tokens that keep the adapter path")
        ax.set_ylabel(self.metric)
        ax.set_title(f"{self.benchmark}: partial-modality inference ({self.mode})", fontsize=10)
        ax.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=90)

    def write(self, directory: Path) -> list[Path]:
        """partial_modality.md, .csv and .png in ``directory``; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"partial_modality.{suffix}" for suffix in ("md", "csv", "png")]
        paths[0].write_text(self.markdown(), encoding="utf-8")
        paths[1].write_text(self.csv_text(), encoding="utf-8")
        self.plot(paths[2])
        return paths
