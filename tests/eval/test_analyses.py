"""`retain-asd table3` (Table 3: wave mixture vs. the embedding-mixture oracle) and `retain-asd layers` (Fig. 2)
on the tiny smoke setup: markdown, PNG and MLflow metrics."""

from __future__ import annotations

import json

import mlflow
import pytest

from retain_asd.models.beats import beats_tiny, write_random_checkpoint


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_corpus):
    """The small corpus as the evaluation corpus (already ingested) and two tiny encoders."""
    root = tmp_path_factory.mktemp("analyses")
    (root / "synth").symlink_to(small_corpus / "synth")
    (root / "corpus_eval").symlink_to(small_corpus / "corpus")
    write_random_checkpoint(root / "teacher.pt", beats_tiny(), seed=0)
    write_random_checkpoint(root / "student.pt", beats_tiny(), seed=1)
    return root


def _overrides(work, pretrain_root, db):
    return [*pretrain_root, f"eval.machine_root={work / 'synth' / 'machines'}",
            f"eval.noise_root={work / 'synth' / 'noise'}", "data.clip_s=2.0", f"data.work_dir={work}",
            f"tracking.tracking_uri=sqlite:///{db}", "eval.source_refs=8", "eval.target_refs=2", "eval.test_normal=2",
            "eval.test_anomaly=2", "eval.batch_size=8", "eval.snrs_db=[0.0]"]


def test_table3_writes_markdown_json_png_and_mlflow_metrics(work, tmp_path, small_pretrain_root, capsys):
    from pipelines.table3 import main

    db = tmp_path / "mlflow.db"
    argv = ["--checkpoint", str(work / "teacher.pt"), "--checkpoint", str(work / "student.pt"), "--out",
            str(tmp_path / "t3"), "--layer", "2", "--snrs", "0", "--resamples", "20",
            *_overrides(work, small_pretrain_root, db), "eval.source_refs=4"]  # the cheapest sets that score
    assert main(argv) == 0
    console = capsys.readouterr().out.splitlines()  # people's lines only; Ray's and MLflow's logs in table3.log
    assert (tmp_path / "t3" / "table3.log").is_file()
    assert console[-1].startswith("written: ") and not [line for line in console if " INFO " in line]
    md = (tmp_path / "t3" / "table3.md").read_text()
    assert "Table 3: teacher, layer 2, no domain normalisation; official score over 2 machines (fan, pump)" in md
    assert "paired draws of the test clips" in md  # what the interval counts
    table = json.loads((tmp_path / "t3" / "table3.json").read_text())
    assert table["layer"] == 2 and table["domain_normalisation"] is False and table["resamples"] == 20
    assert [(c["condition"], c["snr_db"]) for c in table["cells"]] == [
        (c, 0.0) for c in ("factory_a", "factory_b", "mismatch")]
    # The JSON holds exactly the markdown's figures, cell for cell.
    names = {"Factory A": "factory_a", "Factory B": "factory_b", "Mismatch": "mismatch"}
    md_rows = [[x.strip() for x in line.strip("|").split("|")] for line in md.splitlines()
               if line.startswith("| ") and line.split("|")[1].strip() in names]
    assert len(md_rows) == len(table["cells"]) == 3
    for row, cell in zip(md_rows, table["cells"], strict=True):
        lo, hi = cell["ci95"]["diff"]
        assert row == [{v: k for k, v in names.items()}[cell["condition"]], f"{cell['snr_db']:g}",
                       f"{cell['wave']:.2f}", f"{cell['oracle']:.2f}", f"{cell['diff']:.2f}", f"[{lo:.2f}, {hi:.2f}]",
                       f"{cell['students']['student']:.2f}"]
        assert abs(cell["oracle"] - cell["wave"] - cell["diff"]) <= 0.011
        for kind in ("wave", "oracle", "diff"):
            low, high = cell["ci95"][kind]
            assert low <= high and (kind == "diff" or 0.0 <= low <= high <= 100.0)
    assert (tmp_path / "t3" / "table3.png").stat().st_size > 1000
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    (run,) = mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")
    m = run.data.metrics
    for key in ("table3/mismatch_0db/wave_raw", "table3/factory_b_0db/oracle_raw",
                "table3/mismatch_0db/oracle/fan_raw", "table3/factory_a_0db/student/student_raw"):
        assert 0.0 <= m[key] <= 1.0
    assert m["table3/mismatch_0db/diff_ci95_low"] <= m["table3/mismatch_0db/diff_ci95_high"]


def test_layers_scores_every_layer_from_one_forward_pass(work, tmp_path, small_pretrain_root):
    from pipelines.layers import main

    db = tmp_path / "mlflow.db"
    argv = ["--checkpoint", str(work / "teacher.pt"), "--checkpoint", str(work / "student.pt"), "--out",
            str(tmp_path / "l"), *_overrides(work, small_pretrain_root, db), "eval.conditions=[factory_a, mismatch]"]
    assert main(argv) == 0
    md = (tmp_path / "l" / "layers.md").read_text()
    assert "| encoder | L1 | L2 | L3 |" in md and "| teacher |" in md and "| student |" in md
    assert (tmp_path / "l" / "score_per_layer.png").stat().st_size > 1000
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.tracking.MlflowClient()
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")}
    assert {"layers-teacher", "layers-student", "layers"} <= set(runs)
    history = client.get_metric_history(runs["layers-teacher"].info.run_id, "layerwise/hmean_all_primary_dn")
    assert sorted(h.step for h in history) == [1, 2, 3] and all(0.0 <= h.value <= 1.0 for h in history)
    assert "layer_3/hmean_all_primary_dn" in runs["layers-student"].data.metrics


def test_table3_figure_takes_an_interval_that_leaves_out_its_estimate(tmp_path):
    """A percentile bootstrap of the harmonic mean of AUCs may lie wholly above or below the estimate (seen on a
    synthetic world: the wave score under its interval); the table and the figure are still written."""
    from retain_asd.eval.analyses import Table3, Table3Cell, write_table3

    cell = Table3Cell("mismatch", 0.0, wave=0.52, oracle=0.61,
                      ci95={"wave": (0.53, 0.60), "oracle": (0.55, 0.66), "diff": (-0.02, 0.08)})
    other = Table3Cell("factory_b", 0.0, wave=0.70, oracle=0.66,
                       ci95={"wave": (0.65, 0.75), "oracle": (0.60, 0.70), "diff": (-0.1, 0.0)})
    paths = write_table3(Table3(2, "frozen", ["bearing"], [cell, other], 200, "bootstrap"), tmp_path)
    assert [p.name for p in paths] == ["table3.md", "table3.json", "table3.png"]
    assert (tmp_path / "table3.png").stat().st_size > 1000
    assert "52.0" in (tmp_path / "table3.md").read_text()
