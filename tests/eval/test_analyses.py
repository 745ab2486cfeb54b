"""`retain-asd table3` (Table 3: wave mixture vs. the embedding-mixture oracle) and `retain-asd layers` (Fig. 2)
on the tiny smoke setup: markdown, PNG and MLflow metrics."""

from __future__ import annotations

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


def test_table3_writes_markdown_png_and_mlflow_metrics(work, tmp_path, small_pretrain_root):
    from pipelines.table3 import main

    db = tmp_path / "mlflow.db"
    argv = ["--checkpoint", str(work / "teacher.pt"), "--checkpoint", str(work / "student.pt"), "--out",
            str(tmp_path / "t3"), "--layer", "2", *_overrides(work, small_pretrain_root, db)]
    assert main(argv) == 0
    md = (tmp_path / "t3" / "table3.md").read_text()
    assert "Mismatch at 0 dB, layer 2, no domain normalisation" in md
    for row in ("teacher (wave mixture)", "teacher (embedding mixture, oracle)", "student (wave mixture)"):
        assert f"| {row} |" in md
    assert "| method | fan | pump | official |" in md
    assert (tmp_path / "t3" / "table3.png").stat().st_size > 1000
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    (run,) = mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")
    m = run.data.metrics
    for key in ("table3/teacher/wave/official_raw", "table3/teacher/oracle/fan_raw", "table3/student/wave/pump_raw"):
        assert 0.0 <= m[key] <= 1.0


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
