"""evaluate: forwards saved by the cache, figures equal to metrics/knn, end-to-end CLI with MLflow, DCASE mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retain_asd.eval import knn, metrics
from retain_asd.eval.dcase_mode import evaluate_dcase
from retain_asd.eval.embed import Embedder
from retain_asd.eval.evalsets import EvalSetParams, MixtureSource, build_evalsets
from retain_asd.eval.run import evaluate_checkpoint, write_score_files
from retain_asd.models.beats import beats_tiny, write_random_checkpoint


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_corpus) -> Path:
    """A work dir holding the shared small synthetic corpus (2 s clips) under work/corpus and a tiny BEATs."""
    root = tmp_path_factory.mktemp("run")
    for name in ("synth", "corpus"):
        (root / name).symlink_to(small_corpus / name)
    (root / "corpus_eval").symlink_to(small_corpus / "corpus")  # the evaluation corpus, already ingested
    write_random_checkpoint(root / "ckpt.pt", beats_tiny(), seed=0)
    return root


@pytest.fixture(scope="module")
def sets(work):
    params = EvalSetParams(snrs_db=(-5.0, 5.0), source_refs=8, target_refs=2, test_normal=2, test_anomaly=2)
    return build_evalsets(work / "corpus", work / "evalsets", params)


def test_mismatch_costs_no_extra_forwards(work, sets, tmp_path):
    ab = Embedder(work / "ckpt.pt", cache_dir=tmp_path / "ab", batch_size=4)
    evaluate_checkpoint(None, sets, 2, conditions=("factory_a", "factory_b"), embedder=ab)
    abm = Embedder(work / "ckpt.pt", cache_dir=tmp_path / "abm", batch_size=4)
    evaluate_checkpoint(None, sets, 2, conditions=("factory_a", "factory_b", "mismatch"), embedder=abm)
    assert ab.num_clips_encoded == 2 * 2 * 36  # 2 factories x 2 SNRs x 36 clips
    assert (abm.num_clips_encoded, abm.num_forwards) == (ab.num_clips_encoded, ab.num_forwards)


def test_figures_equal_knn_and_metrics(work, sets, tmp_path):
    embedder = Embedder(work / "ckpt.pt", cache_dir=tmp_path, batch_size=8)
    result = evaluate_checkpoint(None, sets, [2, 3], conditions=("factory_a",), embedder=embedder)
    assert {(c.snr_db, c.layer, c.domain_norm) for c in result.cells} == {
        (s, layer, dn) for s in (-5.0, 5.0) for layer in (2, 3) for dn in (False, True)}
    cell = next(c for c in result.cells if c.snr_db == -5.0 and c.layer == 3 and c.domain_norm)
    rows = sets.rows("factory_a", -5.0, "fan")
    clips = MixtureSource(sets.corpus_root).mixtures(rows)
    emb = Embedder(work / "ckpt.pt").embed_waveforms(clips, [3])[3].astype(np.float64)
    role = np.array([r["role"] for r in rows])
    tests = [r for r in rows if r["role"] == "test"]
    scores = knn.score_clips(emb[role == "test"], emb[role == "ref_source"], emb[role == "ref_target"],
                             domain_norm=True)
    fig = metrics.machine_scores(scores, [r["label"] == "anomaly" for r in tests],
                                 [r["domain"] == "target" for r in tests])
    got = cell.machines["fan"]
    np.testing.assert_allclose(got.scores, scores, rtol=1e-6)
    assert got.figures == fig
    assert cell.official == metrics.official_score([m.figures for m in cell.machines.values()])
    m = result.metrics()
    assert m["factory_a/snr_-5/official"] == next(c.official for c in result.cells
                                                  if (c.snr_db, c.layer, c.domain_norm) == (-5.0, 2, False))
    assert m["layer_3/factory_a/snr_-5/official_dn"] == cell.official
    assert m["hmean_all"] == metrics.table2(result.official_by_set())[-1].hmean_all
    files = write_score_files(result, tmp_path / "scores")
    assert (tmp_path / "scores/factory_a/snr_-5/raw/anomaly_score_fan_section_00_test.csv") in files
    assert (tmp_path / "scores/factory_a/snr_-5/raw/decision_result_fan_section_00_test.csv") in files
    assert (tmp_path / "scores/factory_a/snr_-5/layer_3/dn/anomaly_score_pump_section_00_test.csv") in files


def _protocol(work, pretrain_root):
    """Overrides: the small corpus is the evaluation corpus (2 s clips), a disjoint one the pre-training corpus."""
    return [*pretrain_root, f"eval.machine_root={work / 'synth' / 'machines'}",
            f"eval.noise_root={work / 'synth' / 'noise'}", "data.clip_s=2.0"]


def test_evaluate_cli_smoke_preset_writes_tables_and_mlflow_run(work, sets, tmp_path, small_pretrain_root, capsys):
    import mlflow

    from pipelines.evaluate import main

    db = tmp_path / "mlflow.db"
    overrides = [*_protocol(work, small_pretrain_root), f"data.work_dir={work}",
                 f"tracking.tracking_uri=sqlite:///{db}", "eval.source_refs=8",
                 "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2", "eval.batch_size=8",
                 "eval.snrs_db=[-5.0, 5.0]"]
    argv = ["--preset", "smoke", "--checkpoint", str(work / "ckpt.pt"), "--checkpoint", "frozen",
            "--out", str(tmp_path / "out")]
    argv += overrides
    with pytest.warns(UserWarning, match="RANDOM encoder"):
        assert main(argv) == 0
    for name in ("ckpt", "frozen"):
        for f in ("table2.md", "table2.csv", "table2_dn.md", "score_vs_snr.png"):
            assert (tmp_path / "out" / name / f).is_file()
    assert (tmp_path / "out/table2.md").read_text().count("\n") == 4  # header, rule, 2 runs
    # every score says what it was computed on: console line, table headers, MLflow tags
    on = (f"test split of {work / 'synth' / 'machines'} (noise: {work / 'synth' / 'noise'}): 2 machines, 16 + 4 "
          "references (source + target), 8 + 8 test clips (normal + anomalous)")
    out = capsys.readouterr().out
    assert sum(on in line and "hmean_all" in line for line in out.splitlines()) == 2
    for table in ("table2.md", "table2_dn.csv", "ckpt/table2.md", "frozen/table2_dn.csv"):
        assert on in (tmp_path / "out" / table).read_text().splitlines()[0], table
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["evaluate-ckpt-seed0", "evaluate-frozen-seed0"]
    frozen = next(r for r in runs if r.data.tags["frozen"] == "true")
    assert frozen.data.params["objective.name"] == "frozen" and frozen.data.tags["preset"] == "frozen"
    keys = set(runs[0].data.metrics)
    for k in ("factory_a/snr_-5/official", "factory_a/snr_-5/official_dn", "mismatch/snr_5/official",
              "hmean_all", "hmean_all_dn", "factory_b/hmean_all", "factory_a/snr_5/fan/auc_source"):
        assert k in keys
    assert "hmean_low" not in keys  # the smoke grid has no -10 dB: the low-SNR hmean is undefined
    assert {(r.data.tags["eval.split"], r.data.tags["eval.corpus"]) for r in runs} == {
        ("test", f"{work / 'synth' / 'machines'} (noise: {work / 'synth' / 'noise'})")}


def test_evaluate_checkpoint_models_uri_scores_the_registered_student(work, sets, tmp_path, small_pretrain_root,
                                                                      capsys):
    """Acceptance: `evaluate --checkpoint models:/retain-asd-<experiment>/1` gives the figures of the registered
    file (same weights: its embeddings come from the cache the .pt filled), in a run that names the version."""
    import mlflow

    from pipelines.evaluate import main
    from retain_asd import tracking
    from retain_asd.config import dump_yaml, load_config

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    with tracking.mlflow_run(uri, "sweep-x", "pretrain-x-seed0") as run:  # as pre-training logs: its config too
        tracking.log_artifact(dump_yaml(load_config("smoke", overrides=["name=x"]), tmp_path / "config.yaml"))
    registered = tracking.register_student(uri, "sweep-x", run.info.run_id, work / "ckpt.pt", alias="best")
    assert registered.uri == "models:/retain-asd-sweep-x/1"
    overrides = [*_protocol(work, small_pretrain_root), f"data.work_dir={work}", f"tracking.tracking_uri={uri}",
                 "eval.source_refs=8", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2",
                 "eval.batch_size=8", "eval.snrs_db=[-5.0, 5.0]", "eval.conditions=[factory_a]"]
    out = tmp_path / "out"
    assert main(["--preset", "smoke", "--checkpoint", str(work / "ckpt.pt"), "--checkpoint", registered.uri,
                 "--out", str(out), *overrides]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "hmean_all=" in line]
    figures = {line.split(":")[0]: line.split(":", 1)[1] for line in lines}
    assert sorted(figures) == ["ckpt", "retain-asd-sweep-x-v1-seed0"]  # the seed: from the config.yaml its run logged
    assert figures["retain-asd-sweep-x-v1-seed0"] == figures["ckpt"]
    assert (out / "retain-asd-sweep-x-v1-seed0" / "table2.md").is_file()
    cached = work / "checkpoints" / "models" / "retain-asd-sweep-x" / "1" / "ckpt.pt"
    assert cached.read_bytes() == (work / "ckpt.pt").read_bytes()
    runs = {r.info.run_name: r for r in mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("retain-asd").experiment_id])}
    mine = runs["evaluate-retain-asd-sweep-x-v1-seed0"].data
    assert (mine.tags["checkpoint"], mine.tags["pretrain_run_id"]) == (registered.uri, run.info.run_id)
    assert mine.metrics == runs["evaluate-ckpt-seed0"].data.metrics


def test_a_real_pretraining_corpus_needs_an_evaluation_corpus_or_the_synthetic_world_on_purpose(
        tmp_path, capsys, small_pretrain_root):
    import mlflow

    from pipelines.evaluate import main

    db = tmp_path / "mlflow.db"
    argv = ["--preset", "smoke", "--checkpoint", "frozen", "--out", str(tmp_path / "out"), *small_pretrain_root,
            "data.clip_s=2.0", f"data.work_dir={tmp_path / 'work'}", f"tracking.tracking_uri=sqlite:///{db}",
            "eval.synth_machines=[bearing]", "eval.synth_noise=[hvac, hammering]", "eval.source_refs=4",
            "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2", "eval.snrs_db=[0.0]",
            "eval.conditions=[factory_a]"]
    assert main(argv) == 2  # before any work: the scores would silently come from the synthetic world
    err = capsys.readouterr().err
    assert "eval.machine_root / eval.noise_root empty" in err and "eval.synthetic=true" in err
    assert not (tmp_path / "work").exists()
    with pytest.warns(UserWarning, match="RANDOM encoder"):
        assert main([*argv, "eval.synthetic=true"]) == 0
    world = "synthetic evaluation world (data.synth_seed=0)"
    on = f"test split of {world}: 1 machine, 4 + 2 references (source + target), 4 + 4 test clips"
    assert on in capsys.readouterr().out
    assert on in (tmp_path / "out" / "frozen" / "table2_dn.md").read_text().splitlines()[0]
    (run,) = mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("retain-asd").experiment_id])
    assert (run.data.tags["eval.corpus"], run.data.tags["eval.split"]) == (world, "test")
    assert run.data.tags["eval.sizes"].startswith("1 machine, 4 + 2 references")


def test_dcase_mode_on_a_dcase2023_tree(work, tmp_path):
    machine_root = work / "synth" / "machines"
    embedder = Embedder(work / "ckpt.pt", cache_dir=tmp_path, batch_size=8)
    result = evaluate_dcase(embedder, machine_root, [2], clip_s=2.0)
    assert {c.condition for c in result.cells} == {"dcase"}
    cell = next(c for c in result.cells if not c.domain_norm)
    assert sorted(cell.machines) == ["fan_section_00", "pump_section_00"]
    assert len(cell.machines["fan_section_00"].scores) == 16  # 4 normal + 4 anomaly per domain
    assert embedder.num_clips_encoded == 2 * (12 + 4 + 16)
    assert "dcase/official_dn" in result.metrics()
    write_score_files(result, tmp_path / "scores")
    assert (tmp_path / "scores/dcase/raw/anomaly_score_fan_section_00_test.csv").is_file()


def test_evaluate_cli_eat30_preset_on_a_random_official_layout_eat(work, tmp_path, capsys, small_pretrain_root):
    """Acceptance: `evaluate --preset eat30 --checkpoint <EAT .pt> --checkpoint frozen` on the smoke sets."""
    from pipelines.common import run_main
    from pipelines.evaluate import main
    from retain_asd.models.eat import eat_tiny
    from retain_asd.models.eat import write_random_checkpoint as write_random_eat

    eat = write_random_eat(tmp_path / "eat_random.pt", eat_tiny(), seed=0)
    overrides = [*_protocol(work, small_pretrain_root), f"data.work_dir={work}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.source_refs=8",
                 "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2", "eval.batch_size=8",
                 "eval.snrs_db=[-5.0, 5.0]", "eval.conditions=[factory_a]",
                 "eval.layer=2"]  # the tiny EAT has 2 blocks; 'frozen' (eval.ssl_layer 12) is clamped with a warning
    out = tmp_path / "out"
    argv = ["--preset", "eat30", "--checkpoint", str(eat), "--checkpoint", "frozen", "--out", str(out)]
    assert run_main(main, [*argv, *overrides]) == 2  # 'frozen' needs the released checkpoint: named in the error
    assert "EAT-base_epoch30_pt.pt" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="layer 12 > the encoder's 2 blocks"):
        assert run_main(main, [*argv, *overrides, f"model.checkpoint={eat}"]) == 0
    for name in ("eat_random", "frozen"):
        assert (out / name / "table2.md").is_file()
    printed = capsys.readouterr().out
    assert "eat_random: hmean_all_primary_dn=" in printed and "frozen: hmean_all_primary_dn=" in printed
    beats = work / "ckpt.pt"  # a BEATs checkpoint under model.family=eat: an error naming both
    assert run_main(main, ["--preset", "eat30", "--checkpoint", str(beats), "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err
    assert str(beats) in err and "a beats checkpoint, but model.family = 'eat'" in err
