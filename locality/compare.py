"""``python -m locality.compare SWEEP``: the model × dataset table of a sweep's headline metrics.

SWEEP is a parent run's name or id (``--list`` shows the sweeps). Prints one markdown table per
metric, saves a heatmap picture per metric, and logs them to the parent run. The store is
chosen as in the run app (``tracking.uri=… tracking.experiment=…``, or ``--uri``/``--experiment``);
any other ``key=value`` argument, or a store that does not exist, is refused (exit status 2).
"""

from __future__ import annotations

import argparse
import math
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


def collect(client, experiment_id: str, parent_id: str) -> dict[tuple[str, str], dict[str, float]]:
    """(model, dataset) -> metrics of the latest FINISHED child run of that cell."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
    )
    for run in children:
        if run.info.status != "FINISHED":
            continue
        key = (run.data.tags.get("model", "?"), run.data.tags.get("dataset", "?"))
        cells[key] = dict(run.data.metrics)
    return cells


def markdown_table(cells, metric: str, models: list[str], datasets: list[str]) -> str:
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model in models:
        values = []
        for dataset in datasets:
            value = cells.get((model, dataset), {}).get(metric)
            values.append("—" if value is None else f"{value:.4g}")
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def heatmap(cells, metric: str, title: str, models: list[str], datasets: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[cells.get((m, d), {}).get(metric, math.nan) for d in datasets] for m in models], float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(datasets), 1.2 + 0.6 * len(models)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(datasets)):
            text = "—" if math.isnan(grid[i, j]) else f"{grid[i, j]:.3g}"
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=9)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: The run app's keys that compare accepts as ``key=value`` arguments, and their option.
APP_KEYS = {"tracking.uri": "uri", "tracking.experiment": "experiment"}


def compare(sweep: str, uri: str, experiment: str, out_dir: Path | None, log_to_parent: bool = True) -> str:
    from locality.app.tracking import open_client

    client = open_client(uri, create=False)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"experiment {experiment!r} does not exist in {uri}")
    parent = find_sweep(client, exp.experiment_id, sweep)
    cells = collect(client, exp.experiment_id, parent.info.run_id)
    if not cells:
        raise SystemExit(f"sweep {parent.info.run_name} has no finished cells yet")
    models = sorted({m for m, _ in cells})
    datasets = sorted({d for _, d in cells})
    out_dir = out_dir or Path(parent.data.tags.get("locality.sweep_dir", ".")) / "comparison"
    sections = [f"# Sweep {parent.info.run_name} ({parent.info.run_id}): {len(cells)} finished cells"]
    for metric, title, better in METRICS:
        if not any(metric in values for values in cells.values()):
            continue
        sections.append(f"\n## {title} ({better} is better)\n\n" + markdown_table(cells, metric, models, datasets))
        picture = heatmap(cells, metric, title, models, datasets, out_dir / f"{metric}.png")
        if log_to_parent:
            client.log_artifact(parent.info.run_id, str(picture), "comparison")
    report = "\n".join(sections) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(report)
    if log_to_parent:
        client.log_artifact(parent.info.run_id, str(out_dir / "table.md"), "comparison")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m locality.compare",
        description="Print the model × dataset table of a sweep's headline metrics (R²/MSE against the "
                    "UNet where present, sampling time), save a heatmap per metric and log them to the "
                    "sweep's parent run. List the sweeps with --list.",
    )
    parser.add_argument("sweep", nargs="?", help="the parent run's name or id")
    parser.add_argument("--list", action="store_true", help="list the sweeps (parent runs) and exit")
    parser.add_argument("--uri", default=None, help="MLflow tracking URI (default: the project's outputs/mlflow.db)")
    parser.add_argument("--experiment", default="locality", help="MLflow experiment (default: locality)")
    parser.add_argument("--out", type=Path, default=None, help="folder for table.md and the heatmaps "
                        "(default: <sweep dir>/comparison)")
    parser.add_argument("--no-log", action="store_true", help="do not log the pictures to the parent run")
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
    print(compare(args.sweep, uri, args.experiment, args.out, log_to_parent=not args.no_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
