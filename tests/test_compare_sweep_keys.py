"""locality.compare over ANY swept keys (locality.app.sweep_table): tables, layouts, line plots,
and a real sweep over model × sampler.num_steps (which used to collapse to 2 cells)."""

from __future__ import annotations

import contextlib
import io

import pytest

from conftest import run_app


def _store(tmp_path, children, tags):
    """An MLflow store with a sweep parent (``tags``) and FINISHED children
    (params, tags, metrics) -> (uri, client, parent)."""
    from mlflow.tracking import MlflowClient

    from locality.app.tracking import prepare_store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = prepare_store(uri, "locality", str(tmp_path / "art"))
    client = MlflowClient(uri)
    parent = client.create_run(exp, run_name="sweep", tags={"locality.sweep": "true",
                                                            "locality.sweep_dir": str(tmp_path / "sweep"), **tags})
    for params, child_tags, metrics in children:
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, **child_tags})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id)
    return uri, client, parent


def _grid(theta_key="model.mask_threshold"):
    """A θ ablation: pca_locality at three thresholds on two datasets, plus a rerun of one cell."""
    children = []
    for dataset, base in (("mnist", 0.5), ("fashion_mnist", 0.6)):
        for theta in ("0.005", "0.02", "0.1"):
            params = {"model.name": "pca_locality", "dataset.name": dataset, theta_key: theta}
            children.append((params, {"model": "pca_locality", "dataset": dataset},
                             {"r2_vs_unet_final": base + float(theta), "sampling_time_total_s": 1.0}))
    params = {"model.name": "pca_locality", "dataset.name": "mnist", theta_key: "0.1"}
    children.append((params, {"model": "pca_locality", "dataset": "mnist"}, {"r2_vs_unet_final": 0.9}))  # latest wins
    return children


def test_a_theta_ablation_is_tabulated_and_plotted(tmp_path):
    from locality.compare import compare

    uri, client, parent = _store(tmp_path, _grid(), {"sweep.keys": "model.mask_threshold,dataset"})
    report = compare("sweep", uri, "locality", tmp_path / "out", plot="model.mask_threshold")
    assert "6 finished cells" in report and "rows: model.mask_threshold; columns: dataset" in report
    assert "| model.mask_threshold | fashion_mnist | mnist |" in report
    # numeric order (0.005 < 0.02 < 0.1), and the latest run of the repeated cell
    assert "| 0.005 | 0.605 | 0.505 |\n| 0.02 | 0.62 | 0.52 |\n| 0.1 | 0.7 | 0.9 |" in report
    assert (tmp_path / "out" / "r2_vs_unet_final_vs_model.mask_threshold.png").exists()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert "comparison/r2_vs_unet_final_vs_model.mask_threshold.png" in logged
    assert "comparison/r2_vs_unet_final.png" in logged and "comparison/table.md" in logged

    from locality.app.sweep_table import collect_cells, metric_lines

    cells = collect_cells(client, parent.info.experiment_id, parent.info.run_id, ["model.mask_threshold", "dataset"])
    xs, series = metric_lines(cells, "r2_vs_unet_final", "model.mask_threshold", ["model.mask_threshold", "dataset"])
    assert xs == [0.005, 0.02, 0.1]
    assert series == {"dataset=fashion_mnist": pytest.approx([0.605, 0.62, 0.7]),
                      "dataset=mnist": pytest.approx([0.505, 0.52, 0.9])}

    swapped = compare("sweep", uri, "locality", tmp_path / "out2", log_to_parent=False,
                      rows=["dataset"], cols=["model.mask_threshold"], metrics=["r2_vs_unet_final"])
    assert "| dataset | 0.005 | 0.02 | 0.1 |" in swapped and "| mnist | 0.505 | 0.52 | 0.9 |" in swapped
    assert "sampling time" not in swapped


def test_keys_from_the_overrides_tag_and_errors(tmp_path):
    from locality.compare import main

    tags = {"sweep.overrides": "model=pca_locality model.mask_threshold=0.005,0.02,0.1 dataset=mnist,fashion_mnist"}
    uri, _, _ = _store(tmp_path, _grid(), tags)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["sweep", "--uri", uri, "--out", str(tmp_path / "o"), "--no-log"]) == 0
    assert "| model.mask_threshold | fashion_mnist | mnist |" in out.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["sweep", "--uri", uri, "--no-log", "--rows", "sampler.seed"]) == 2
        assert main(["sweep", "--uri", uri, "--no-log", "--plot", "dataset"]) == 2
        assert main(["sweep", "--uri", uri, "--no-log", "--rows", "dataset", "--cols", "dataset"]) == 2
    text = err.getvalue()
    assert "'sampler.seed' is not a key of this sweep; its keys are model.mask_threshold, dataset" in text
    assert "--plot dataset: its values ['fashion_mnist', 'mnist'] are not all numbers" in text
    assert "the keys model.mask_threshold vary in this sweep but are in neither --rows nor --cols" in text


def test_sweep_keys_tag_lists_what_differs():
    from locality.app.sweep_table import sweep_keys_tag

    cells = [["model=a", "x=1", "+y=2"], ["model=a", "x=2", "+y=3"]]
    assert sweep_keys_tag(cells) == "x,y"


@pytest.mark.slow
def test_a_real_sweep_over_model_and_num_steps_has_four_cells(tmp_path):
    data = ["dataset=gaussian_field", "dataset.num_images=20", "dataset.resolution=6", "sampler.num_samples=2",
            "sampler.batch_size=2", "hardware=cpu"]
    proc = run_app(["--multirun", "model=wiener,nearest_dataset", "sampler.num_steps=1,2", *data], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from locality.compare import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--list", "--uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    name = out.getvalue().split("\t")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([name, "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--plot", "sampler.num_steps"]) == 0
    report = out.getvalue()
    assert "4 finished cells" in report and "| model | 1 | 2 |" in report
    assert "| nearest_dataset |" in report and "| wiener |" in report
    assert list((tmp_path / "outputs" / "multiruns").glob("*/*/comparison/sampling_time_total_s_vs_sampler.num_steps.png"))
