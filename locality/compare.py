"""``python -m locality.compare SWEEP``: the table of a sweep's headline metrics over its swept keys.

SWEEP is a parent run's name or id (``--list`` shows the sweeps). Prints one markdown table per
metric over ANY swept keys (``--rows``/``--cols``, default the keys that vary:
:mod:`locality.app.sweep_table`), saves a heatmap picture per metric and, with ``--plot KEY``, each
metric against a numeric swept key as lines, and logs them to the parent run. The store is
chosen as in the run app (``tracking.uri=… tracking.experiment=…``, or ``--uri``/``--experiment``);
any other ``key=value`` argument, or a store that does not exist, is refused (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

METRICS = [
    ("r2_vs_unet_final", "R² vs UNet (trajectory, last step)", "higher"),
    ("mse_vs_unet_final", "MSE vs UNet (trajectory, last step)", "lower"),
    ("r2_vs_unet_single_final", "R² vs UNet (single step, last step)", "higher"),
    ("mse_vs_unet_single_final", "MSE vs UNet (single step, last step)", "lower"),
    ("sampling_time_total_s", "sampling time (s)", "lower"),
]


def default_uri() -> str:
    from locality.app.config import project_root

    return f"sqlite:///{project_root() / 'outputs' / 'mlflow.db'}"


def list_sweeps(client, experiment_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string="tags.`locality.sweep` = 'true'",
                              order_by=["attributes.start_time DESC"])


def find_sweep(client, experiment_id: str, sweep: str):
    for run in list_sweeps(client, experiment_id):
        if sweep in (run.info.run_id, run.info.run_name):
            return run
    raise SystemExit(f"no sweep named or with id {sweep!r}; list them with: python -m locality.compare --list")


#: The run app's keys that compare accepts as ``key=value`` arguments, and their option.
APP_KEYS = {"tracking.uri": "uri", "tracking.experiment": "experiment"}


def metric_list(names: list[str] | None) -> list[tuple[str, str, str]]:
    """(metric, title, which is better) of the headline METRICS, or of the ``names`` given
    (any metric the cells logged, e.g. an analysis sweep's heldout_radius_unet_t500)."""
    if not names:
        return METRICS
    known = {m: (m, title, better) for m, title, better in METRICS}
    return [known.get(name, (name, name, "")) for name in names]


def compare(sweep: str, uri: str, experiment: str, out_dir: Path | None, log_to_parent: bool = True,
            rows: list[str] | None = None, cols: list[str] | None = None, plot: str | None = None,
            metrics: list[str] | None = None) -> str:
    """The report of a sweep: a table and a heatmap per metric over its swept keys (``rows`` and
    ``cols``: the keys of the table's rows and columns; default: locality.app.sweep_table.layout),
    and with ``plot`` (a numeric swept key) each metric against it, one line per other cell."""
    from locality.app.sweep_table import collect_cells, describe, heatmap, layout, line_plot, markdown_table, swept_keys, varying
    from locality.app.tracking import open_client

    client = open_client(uri, create=False)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"experiment {experiment!r} does not exist in {uri}")
    parent = find_sweep(client, exp.experiment_id, sweep)
    candidates = swept_keys(parent.data.tags)
    cells = collect_cells(client, exp.experiment_id, parent.info.run_id, candidates)
    if not cells:
        raise SystemExit(f"sweep {parent.info.run_name} has no finished cells yet")
    keys = varying(cells, candidates)
    row_keys, col_keys = layout(keys, rows, cols, candidates)
    if plot is not None and plot not in candidates:
        raise ValueError(f"--plot {plot!r} is not a key of this sweep; its keys are {', '.join(candidates)}")
    out_dir = out_dir or Path(parent.data.tags.get("locality.sweep_dir", ".")) / "comparison"
    values = "; ".join(f"{k}: {', '.join(v)}" for k, v in describe(cells, keys).items())
    sections = [f"# Sweep {parent.info.run_name} ({parent.info.run_id}): {len(cells)} finished cells\n\n"
                f"swept: {values}; rows: {', '.join(row_keys)}; columns: {', '.join(col_keys) or '—'}"]
    pictures = []
    for metric, title, better in metric_list(metrics):
        if not any(metric in cell.metrics for cell in cells):
            continue
        heading = f"{title} ({better} is better)" if better else title
        sections.append(f"\n## {heading}\n\n" + markdown_table(cells, metric, row_keys, col_keys))
        pictures.append(heatmap(cells, metric, title, row_keys, col_keys, out_dir / f"{metric}.png"))
        if plot is not None:
            pictures.append(line_plot(cells, metric, title, plot, keys, out_dir / f"{metric}_vs_{plot}.png"))
    report = "\n".join(sections) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(report)
    if log_to_parent:
        for picture in [*pictures, out_dir / "table.md"]:
            client.log_artifact(parent.info.run_id, str(picture), "comparison")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m locality.compare",
        description="Print the table of a sweep's headline metrics (R²/MSE against the UNet where present, "
                    "sampling time) over its swept keys, save a heatmap per metric (and with --plot a line "
                    "plot against a numeric key) and log them to the sweep's parent run. List the sweeps "
                    "with --list.",
    )
    parser.add_argument("sweep", nargs="?", help="the parent run's name or id")
    parser.add_argument("--list", action="store_true", help="list the sweeps (parent runs) and exit")
    parser.add_argument("--uri", default=None, help="MLflow tracking URI (default: the project's outputs/mlflow.db)")
    parser.add_argument("--experiment", default="locality", help="MLflow experiment (default: locality)")
    parser.add_argument("--out", type=Path, default=None, help="folder for table.md and the heatmaps "
                        "(default: <sweep dir>/comparison)")
    parser.add_argument("--no-log", action="store_true", help="do not log the pictures to the parent run")
    parser.add_argument("--rows", default=None, help="comma-separated swept keys of the table's rows "
                        "(default: every varying key but the columns')")
    parser.add_argument("--cols", default=None, help="comma-separated swept keys of the table's columns "
                        "(default: dataset when it varies with other keys, else the last varying key)")
    parser.add_argument("--plot", default=None, metavar="KEY", help="also plot each metric against this numeric "
                        "swept key, one line per combination of the other keys")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics to report (default: the "
                        "headline ones: R²/MSE vs the UNet, sampling time); any metric the cells logged")
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = {}
    for item in [a for a in argv if "=" in a and not a.startswith("-")]:
        key, _, value = item.partition("=")
        if key not in APP_KEYS:
            parser.error(f"unknown argument {item!r}: compare takes {' and '.join(k + '=…' for k in APP_KEYS)} "
                         f"(as the run app), --uri or --experiment")
        settings[APP_KEYS[key]] = value
        argv.remove(item)
    args = parser.parse_args(argv)
    for name, value in settings.items():
        setattr(args, name, value)
    uri = args.uri or default_uri()
    from locality.app.tracking import TrackingStoreError, open_client

    try:
        client = open_client(uri, create=False)
    except TrackingStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        exp = client.get_experiment_by_name(args.experiment)
        runs = list_sweeps(client, exp.experiment_id) if exp else []
        if not runs:
            print(f"no sweeps in experiment {args.experiment!r} at {uri}")
        for run in runs:
            print(f"{run.info.run_name}\t{run.info.run_id}\t{run.info.status}\t"
                  f"cells={run.data.tags.get('cells', '?')} failed={run.data.tags.get('failed_cells', '?')}")
        return 0
    if not args.sweep:
        parser.error("give a sweep (a parent run's name or id), or --list")
    split = lambda text: [k.strip() for k in text.split(",") if k.strip()] if text else None  # noqa: E731
    try:
        print(compare(args.sweep, uri, args.experiment, args.out, log_to_parent=not args.no_log,
                      rows=split(args.rows), cols=split(args.cols), plot=args.plot, metrics=split(args.metrics)))
    except ValueError as e:  # a key that is not the sweep's, a non-numeric --plot key: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
