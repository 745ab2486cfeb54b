"""`compare_experiment` / `retain-asd compare` on a real SQLite MLflow store: runs grouped by preset, mean and
95% interval over seeds, failed runs shown, CSV equal to the runs' MLflow metrics, one PNG per condition."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from retain_asd import tracking
from retain_asd.eval.compare import compare_experiment

CONDITIONS = ("factory_a", "mismatch")
SNRS = (-10, -5, 0, 5)


def _figures(rng) -> dict[str, float]:
    """Metric keys as `EvalResult.metrics` logs them (cells, per-condition and overall hmeans, raw and DN)."""
    out = {}
    for dn in ("", "_dn"):
        for c in CONDITIONS:
            for s in SNRS:
                out[f"{c}/snr_{s}/official{dn}"] = float(rng.uniform(0.4, 0.9))
        out[f"hmean_low{dn}"] = float(rng.uniform(0.4, 0.9))
        out[f"hmean_all{dn}"] = float(rng.uniform(0.4, 0.9))
    return out


@pytest.fixture()
def store(tmp_path):
    uri = tracking.resolve_tracking_uri("", tmp_path / "work")
    rng = np.random.default_rng(0)
    logged = {}
    for preset in ("tagging_pm5", "denoise"):
        for seed in (0, 1):
            tags = {"kind": "evaluate", "preset": preset, "seed": str(seed)}
            with tracking.mlflow_run(uri, "exp", f"evaluate-{preset}-seed{seed}", {"train": {"seed": seed}}, tags):
                figures = _figures(rng)
                tracking.log_metrics(figures)
            logged[(preset, seed)] = figures
    with pytest.raises(RuntimeError):  # a run that crashed: MLflow marks it FAILED
        with tracking.mlflow_run(uri, "exp", "evaluate-broken-seed0", None,
                                 {"kind": "evaluate", "preset": "broken", "seed": "0"}):
            raise RuntimeError("worker died")
    with tracking.mlflow_run(uri, "exp", "pretrain-denoise-seed0", None, {"kind": "pretrain"}):
        tracking.log_metrics({"loss": 1.0}, step=1)  # not an evaluation: never a row
    return uri, logged


def test_two_presets_two_seeds_means_intervals_and_failed(store, tmp_path):
    uri, logged = store
    result = compare_experiment("exp", tracking_uri=uri, out_dir=tmp_path / "cmp")
    names = [r.name for r in result.rows]
    assert sorted(names) == ["broken", "denoise", "tagging_pm5"] and names[-1] == "broken"
    assert result.rows[-1].status == "FAILED"
    assert result.columns == [(c, s) for c in CONDITIONS for s in SNRS]
    # The CSV holds exactly the mean (and t-interval) of the runs' MLflow metrics.
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    for preset in ("tagging_pm5", "denoise"):
        for key in logged[(preset, 0)]:
            values = [logged[(preset, s)][key] for s in (0, 1)]
            assert float(rows[preset][key]) == pytest.approx(np.mean(values), abs=1e-12)
            half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
            assert float(rows[preset][f"{key}_ci95"]) == pytest.approx(half, abs=1e-12)
        assert rows[preset]["status"] == "ok" and rows[preset]["seeds"] == "0 1"
    assert rows["broken"]["status"] == "FAILED" and rows["broken"]["hmean_low"] == ""
    # Ranked by hmean_low, best first.
    means = {p: np.mean([logged[(p, s)]["hmean_low"] for s in (0, 1)]) for p in ("tagging_pm5", "denoise")}
    assert names[:2] == sorted(means, key=means.get, reverse=True)
    # Markdown: the Table-2 layout, raw primary, both variants; one PNG per condition x variant.
    md = result.markdown
    assert "### raw kNN scores (primary)" in md and "### DN (GenRep domain normalisation) (secondary)" in md
    assert md.index("(primary)") < md.index("(secondary)")
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert header.endswith("| mismatch 5 dB | hmean{-10,-5,0} | All |")
    best = names[0]
    e = result.rows[0].estimates["hmean_low"]
    assert f"| {best} | 2 | ok |" in md and f"{100 * e.mean:.2f} ± {100 * e.half_width:.2f} |" in md
    pngs = sorted(p.name for p in result.paths if p.suffix == ".png")
    assert pngs == ["snr_factory_a_dn.png", "snr_factory_a_raw.png", "snr_mismatch_dn.png", "snr_mismatch_raw.png"]
    assert all(p.stat().st_size > 1000 for p in result.paths)


def test_comparison_is_logged_and_never_compared_again(store, tmp_path):
    uri, _ = store
    first = compare_experiment("exp", tracking_uri=uri, out_dir=tmp_path / "a", metric="hmean_low_dn")
    assert first.primary == "dn" and first.markdown.index("DN (GenRep") < first.markdown.index("raw kNN")
    runs = {r["run_id"]: r for r in tracking.experiment_runs(uri, "exp")}
    logged = runs[first.run_id]
    assert logged["tags"]["kind"] == "compare" and logged["params"]["metric"] == "hmean_low_dn"
    second = compare_experiment("exp", tracking_uri=uri, out_dir=tmp_path / "b", log_run=False)
    assert len(second.rows) == 3 and second.run_id is None
    # --runs narrows with MLflow's filter syntax
    only = compare_experiment("exp", tracking_uri=uri, out_dir=tmp_path / "c", runs="tags.preset = 'denoise'",
                              log_run=False)
    assert [r.name for r in only.rows] == ["denoise"]


def test_cli_prints_the_table_and_names_a_missing_experiment(store, tmp_path, capsys):
    from pipelines.cli import main

    uri, _ = store
    assert main(["compare", "--experiment", "exp", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| run | seeds | status | factory_a -10 dB" in out and "comparison.csv" in out
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "'nope' not found" in err and "exp" in err


def test_cli_store_paths_read_only_and_an_empty_filter(store, tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    uri, _ = store
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = uri[len("sqlite:///"):]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # a plain path to the .db file is that SQLite store (relative too)
    assert main(["compare", "--experiment", "exp", "--tracking-uri", "work/mlflow.db", "--no-log",
                 "--out", str(tmp_path / "o")]) == 0
    assert "| run | seeds | status |" in capsys.readouterr().out
    # mistyped stores: one line, exit 2, nothing created
    for wrong in ("work/mlfow.db", f"sqlite:///{tmp_path}/nowhere/mlflow.db", f"sqlte:///{db}", "work"):
        assert main(["compare", "--experiment", "exp", "--tracking-uri", wrong, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("retain-asd compare: error: ") and len(err.strip().splitlines()) == 2, err
        assert "Traceback" not in err and "PATH/mlflow.db" in err
    assert main(["compare", "--experiment", "exp", "data.work_dir=elsewhere", "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'elsewhere' / 'mlflow.db'}: no MLflow store there" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*") if p.parent.name != "o" and p.name != "o") == before
    # a filter that matches nothing names the presets there are
    assert main(["compare", "--experiment", "exp", "--tracking-uri", uri, "--runs", "tags.preset = 'tagging'",
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "no evaluation runs matching \"tags.preset = 'tagging'\"; its presets: broken, denoise, tagging_pm5" in err
