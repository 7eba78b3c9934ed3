"""The cells of a sweep keyed by ANY swept keys, their markdown tables, heatmaps and line plots
(used by ``python -m locality.compare``; reads MLflow runs, writes files, logs nothing itself).

A sweep's keys come from its parent run: the tag ``sweep.keys`` (the override keys whose value
differs between the sweep's cells, written by :class:`locality.app.sweep.SweepTracking`, sweeper
params of an experiment preset included), else the sweep overrides in ``sweep.overrides``, else
``model`` and ``dataset`` (the children's tags). A cell's value of a key is the child's param of
that name, or of ``<key>.name`` for a config group (``model=wiener`` -> ``model.name``), or its
tag; only keys whose value differs between the finished cells are kept. Of several finished runs
of one cell (a cell run again), the latest counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING = "—"
FALLBACK_KEYS = ("model", "dataset")


@dataclass
class Cell:
    """One finished child run: its value of every candidate key, and its metrics."""

    values: dict[str, str]
    metrics: dict[str, float]


def _sort_key(value: str) -> tuple:
    """Numbers in numeric order, before words in alphabetical order."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def sweep_keys_tag(cells: Sequence[Sequence[str]]) -> str:
    """The parent's ``sweep.keys`` tag: the override keys whose value differs between the cells
    (each a list of ``key=value`` overrides, sweeper params included), in the order given."""
    values: dict[str, set[str]] = {}
    for overrides in cells:
        for item in overrides:
            key, _, value = item.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    return ",".join(k for k, seen in values.items() if len(seen) > 1)


def swept_keys(tags: dict[str, str]) -> list[str]:
    """The candidate keys of a sweep from its parent's tags (module doc)."""
    if tags.get("sweep.keys"):
        return [k for k in tags["sweep.keys"].split(",") if k]
    overrides = tags.get("sweep.overrides", "").split()
    if overrides:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
            keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
        except Exception:  # noqa: BLE001 - a tag that does not parse (quoted spaces): the fallback
            keys = []
        if keys:
            return keys
    return list(FALLBACK_KEYS)


def cell_value(key: str, params: dict[str, str], tags: dict[str, str]) -> str:
    """A child run's value of a swept key (module doc); "—" when the run has none."""
    for name in (key, f"{key}.name"):
        if name in params:
            return params[name]
    return tags.get(key, MISSING)


def collect_cells(client, experiment_id: str, parent_id: str, keys: Sequence[str]) -> list[Cell]:
    """The latest FINISHED child of every distinct combination of ``keys``' values."""
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    latest: dict[tuple[str, ...], Cell] = {}
    for run in children:
        if run.info.status != "FINISHED":
            continue
        values = {k: cell_value(k, run.data.params, run.data.tags) for k in keys}
        latest[tuple(values.values())] = Cell(values, dict(run.data.metrics))
    return list(latest.values())


def varying(cells: Sequence[Cell], keys: Sequence[str]) -> list[str]:
    """The keys whose value differs between cells (all keys when none differs, so that a
    one-cell sweep still has a row)."""
    found = [k for k in keys if len({c.values[k] for c in cells}) > 1]
    return found or list(keys[:1])


def layout(keys: Sequence[str], rows: Sequence[str] | None, cols: Sequence[str] | None,
           available: Sequence[str]) -> tuple[list[str], list[str]]:
    """(row keys, column keys). Defaults: ``dataset`` as the columns when it varies with other
    keys, else the last varying key; every other varying key in the rows. A chosen key must be
    one of the sweep's keys (``available``)."""
    for key in [*(rows or []), *(cols or [])]:
        if key not in available:
            raise ValueError(f"{key!r} is not a key of this sweep; its keys are {', '.join(available)} "
                             f"(--rows/--cols take those)")
    if rows is None and cols is None:
        if len(keys) == 1:
            return list(keys), []
        col = "dataset" if "dataset" in keys else keys[-1]
        return [k for k in keys if k != col], [col]
    if rows is None:
        rows = [k for k in keys if k not in cols]
    if cols is None:
        cols = [k for k in keys if k not in rows]
    return list(rows), list(cols)


def _combos(cells: Sequence[Cell], keys: Sequence[str]) -> list[tuple[str, ...]]:
    combos = {tuple(c.values[k] for k in keys) for c in cells}
    return sorted(combos, key=lambda combo: tuple(_sort_key(v) for v in combo))


def _value(cells: Sequence[Cell], where: dict[str, str], metric: str) -> float:
    """The metric of the cell matching ``where`` (nan if none, or if several: a key left out
    of rows and columns that still varies is an ambiguity, refused by :func:`table_grid`)."""
    found = [c.metrics.get(metric, math.nan) for c in cells if all(c.values[k] == v for k, v in where.items())]
    return found[0] if len(found) == 1 else math.nan


def table_grid(cells: Sequence[Cell], metric: str, rows: Sequence[str], cols: Sequence[str]):
    """(row combos, column combos, values [rows][cols]) of one metric."""
    hidden = [k for k in (cells[0].values if cells else {}) if k not in rows and k not in cols
              and len({c.values[k] for c in cells}) > 1]
    if hidden:
        raise ValueError(f"the keys {', '.join(hidden)} vary in this sweep but are in neither --rows nor --cols: "
                         f"add them to one of the two")
    row_combos, col_combos = _combos(cells, rows), _combos(cells, cols)
    grid = [[_value(cells, {**dict(zip(rows, r)), **dict(zip(cols, c))}, metric) for c in col_combos]
            for r in row_combos]
    return row_combos, col_combos, grid


def column_label(cols: Sequence[str], combo: tuple[str, ...]) -> str:
    """A column's header: the value alone for one column key, else key=value pairs."""
    if len(cols) == 1:
        return combo[0]
    return ", ".join(f"{k}={v}" for k, v in zip(cols, combo)) or "value"


def markdown_table(cells: Sequence[Cell], metric: str, rows: Sequence[str], cols: Sequence[str]) -> str:
    """One markdown table: a column per row key, then one per column combination."""
    row_combos, col_combos, grid = table_grid(cells, metric, rows, cols)
    heads = [column_label(cols, c) for c in col_combos]
    lines = ["| " + " | ".join([*rows, *heads]) + " |", "|" + "---|" * (len(rows) + len(heads))]
    for combo, values in zip(row_combos, grid):
        shown = [MISSING if math.isnan(v) else f"{v:.4g}" for v in values]
        lines.append("| " + " | ".join([*combo, *shown]) + " |")
    return "\n".join(lines)


def heatmap(cells: Sequence[Cell], metric: str, title: str, rows: Sequence[str], cols: Sequence[str],
            path: Path) -> Path:
    """The table of one metric as a heatmap picture (rows × columns, values written in)."""
    import numpy as np

    from locality.analysis.figures import pyplot, save_figure

    row_combos, col_combos, grid = table_grid(cells, metric, rows, cols)
    values = np.array(grid, float)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.5 * len(col_combos), 1.2 + 0.6 * len(row_combos)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_combos)), [column_label(cols, c) for c in col_combos], rotation=30, ha="right")
    ax.set_yticks(range(len(row_combos)), [", ".join(r) for r in row_combos])
    ax.set_xlabel(", ".join(cols))
    ax.set_ylabel(", ".join(rows))
    for i in range(len(row_combos)):
        for j in range(len(col_combos)):
            text = MISSING if math.isnan(values[i, j]) else f"{values[i, j]:.3g}"
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=9)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return save_figure(fig, path)


def metric_lines(cells: Sequence[Cell], metric: str, x_key: str, keys: Sequence[str]) -> tuple[list[float], dict]:
    """(x values, {label of the other keys' values: metric at each x}) for a numeric key."""
    try:
        xs = sorted({float(c.values[x_key]) for c in cells})
    except ValueError:
        raise ValueError(f"--plot {x_key}: its values {sorted({c.values[x_key] for c in cells})} are not all "
                         f"numbers; plot against a numeric swept key") from None
    others = [k for k in keys if k != x_key]
    series: dict[str, list[float]] = {}
    for combo in _combos(cells, others):
        where = dict(zip(others, combo))
        label = ", ".join(f"{k}={v}" for k, v in where.items()) or metric
        ys = []
        for x in xs:
            found = [c.metrics.get(metric, math.nan) for c in cells
                     if float(c.values[x_key]) == x and all(c.values[k] == v for k, v in where.items())]
            ys.append(found[0] if found else math.nan)
        series[label] = ys
    return xs, series


def line_plot(cells: Sequence[Cell], metric: str, title: str, x_key: str, keys: Sequence[str], path: Path) -> Path:
    """A metric against a numeric swept key, one line per combination of the other keys."""
    from locality.analysis.figures import line_plot as draw

    xs, series = metric_lines(cells, metric, x_key, keys)
    return draw(series, xs, path, title, x_key, metric)


def describe(cells: Sequence[Cell], keys: Sequence[str]) -> dict[str, Any]:
    """The values each key takes (for the report's header)."""
    return {k: [v for (v,) in _combos(cells, [k])] for k in keys}
