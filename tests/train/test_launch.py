"""Launch: loop config from a Config, clear errors, `frozen` export, and `pretrain` end to end on the synthetic
corpus with a real Ray Train run that is stopped after a checkpoint and resumed from it (2 fits)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from retain_asd.config import ConfigError, load_config, to_dict
from retain_asd.corpus.labels import LabelVocab
from retain_asd.models.beats import beats_tiny, load_beats, write_random_checkpoint
from retain_asd.train.checkpoint import read_train_state, state_digest
from retain_asd.train.launch import loop_config_from, pretrain, read_metrics
from retain_asd.train.loop_config import LoopConfig, snr_sampler_args

WORLDS: list[str] = []  # overrides pointing data.* / eval.* at the small synthetic worlds (conftest)


@pytest.fixture(autouse=True)
def _worlds(small_worlds):
    WORLDS[:] = small_worlds


def _cfg(tmp_path, preset="smoke", *more):
    return load_config(preset, overrides=[f"data.work_dir={tmp_path / 'data'}", *WORLDS,
                                          f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *more])


def _mlflow_runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow, mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")


def test_loop_config_is_typed_frozen_and_checked(tmp_path):
    init = write_random_checkpoint(tmp_path / "init.pt", beats_tiny())
    labels = tmp_path / "labels.json"
    LabelVocab(("fan_a", "pump_a"), ("noise_hum",)).to_json(labels)
    cfg = _cfg(tmp_path, "smoke", "objective.teacher_inputs=unit_power", "mixing.snr_sampler=fixed", "mixing.snr_db=3")
    config = loop_config_from(cfg, labels, init)
    assert isinstance(config, LoopConfig)
    assert (config.num_classes, config.num_machine_classes) == (3, 2)
    # the config sections as they are, plus what the driver resolves
    assert (config.objective, config.mixing, config.train, config.model) == (cfg.objective, cfg.mixing, cfg.train,
                                                                             cfg.model)
    assert snr_sampler_args(config.mixing) == {"kind": "fixed", "snr_db": 3.0}
    assert config.batch_size_per_worker == 2 and config.init_checkpoint == str(init.resolve())
    assert config.stop == cfg.train.total_steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.align_layer = 1
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    with pytest.raises(TypeError, match="learning_rate"):  # a misspelt field fails on the driver
        LoopConfig(**{**fields, "learning_rate": 1.0})
    with pytest.raises(TypeError, match=r"LoopConfig.batch_size_per_worker = '2'"):
        LoopConfig(**{**fields, "batch_size_per_worker": "2"})
    with pytest.raises(TypeError, match=r"LoopConfig.objective = 'tagging': expected ObjectiveConfig"):
        LoopConfig(**{**fields, "objective": "tagging"})
    with pytest.raises(ConfigError, match="objective.align_layer"):
        loop_config_from(_cfg(tmp_path, "smoke", "objective.align_layer=4"), labels, init)  # tiny has 3
    with pytest.raises(ValueError, match="stop_at_step"):
        loop_config_from(cfg, labels, init, stop_at_step=7)


def test_missing_checkpoint_is_named(tmp_path):
    cfg = _cfg(tmp_path, "smoke", f"model.checkpoint={tmp_path / 'BEATs_iter3.pt'}")
    with pytest.raises(FileNotFoundError, match=r"model.checkpoint = .*BEATs_iter3.pt"):
        pretrain(cfg, tmp_path / "out", track=False)


def test_frozen_exports_the_initial_encoder_without_training(tmp_path):
    cfg = _cfg(tmp_path, "frozen", "model.size=tiny", "model.init=random")
    with pytest.warns(UserWarning, match="RANDOM tiny BEATs"):
        result = pretrain(cfg, tmp_path / "out")
    assert result.step == 0 and result.checkpoint_path is None
    exported = load_beats(result.student_path)
    assert state_digest(exported.state_dict()) == state_digest(load_beats(tmp_path / "out" / "init_beats_tiny_seed0.pt")
                                                               .state_dict())
    assert to_dict(load_config(path=result.config_path)) == to_dict(cfg)
    _, runs = _mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]


def test_cli_frozen_and_missing_checkpoint(ray_local, tmp_path, capsys):
    from pipelines.pretrain import main

    common = [f"data.work_dir={tmp_path / 'data'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
              *WORLDS]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(["--preset", "frozen", "--out", str(tmp_path / "frozen"), "model.size=tiny", "model.init=random",
                     *common]) == 0
    printed = capsys.readouterr().out
    assert "trains nothing" in printed and str(tmp_path / "frozen" / "student_beats.pt") in printed
    load_beats(tmp_path / "frozen" / "student_beats.pt")
    missing = tmp_path / "nowhere.pt"
    assert main(["--preset", "smoke", "--out", str(tmp_path / "x"), f"model.checkpoint={missing}", *common]) == 2
    assert "model.checkpoint" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--out", str(tmp_path / "x"), "train.lr=-1"]) == 2


def test_without_a_dashboard_the_trainer_runs_no_placement_group_cleaner(ray_local, tmp_path, monkeypatch):
    """The session's embedded Ray has no dashboard, so no State API: Ray Train's placement-group cleaner could
    never see the controller die, and each fit waited 12 s for it to stop. There the trainer leaves it out;
    with a dashboard it is Ray's TorchTrainer, cleaner included."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from retain_asd.train.launch import trainer_class

    def default_callbacks(cls) -> list[type]:
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="t", storage_path=str(tmp_path)))
        return [type(c) for c in trainer._create_default_callbacks()]

    local = trainer_class()
    assert issubclass(local, TorchTrainer) and local is not TorchTrainer
    with_cleaner = default_callbacks(TorchTrainer)
    assert PlacementGroupCleanerCallback in with_cleaner
    assert default_callbacks(local) == [c for c in with_cleaner if c is not PlacementGroupCleanerCallback]
    monkeypatch.setenv("RAY_OVERRIDE_DASHBOARD_URL", "127.0.0.1:8265")  # a cluster with its dashboard
    assert trainer_class() is TorchTrainer


def test_pretrain_smoke_stops_after_a_checkpoint_and_resumes(ray_local, tmp_path):
    small_sets = ["eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2"]
    cfg = _cfg(tmp_path, "smoke", "train.validate_every=2", *small_sets)  # rank 0 scores the validation sets
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="RANDOM"):
        first = pretrain(cfg, out, stop_at_step=3)
    assert (first.step, first.completed) == (3, False)
    exported_first = first.student_path.stat().st_mtime  # after that fit() returned
    saved = read_train_state(first.checkpoint_path)
    saved_optimizer = state_digest(saved["optimizer"])
    assert all(int(s["step"]) == 3 for s in saved["optimizer"]["state"].values())

    second = pretrain(cfg, out)  # same config + out dir: Ray Train restores the latest checkpoint
    assert (second.step, second.completed) == (6, True)
    history = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in history] == [2, 3, 4, 6]  # log_every 2, checkpoint 3, stop, resume at 4
    resumed = history[2]
    assert resumed["resumed_from_step"] == 3 and resumed["optimizer_sha256_at_resume"] == saved_optimizer
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["loss_mixture"]) for m in history)

    final = read_train_state(second.checkpoint_path)
    assert final["step"] == 6 and final["data"]["micro_batches_seen"] == 12
    # Adam's per-parameter step counters continued from 3 (a fresh optimizer would show 3 here).
    assert all(int(s["step"]) == 6 for s in final["optimizer"]["state"].values())

    student = load_beats(second.student_path)  # official layout, strict load
    assert state_digest(student.state_dict()) == state_digest(final["student"])
    assert not torch.equal(student.patch_embedding.weight,
                           load_beats(out / "init_beats_tiny_seed0.pt").patch_embedding.weight)
    assert to_dict(load_config(path=out / "config.yaml")) == to_dict(cfg)

    again = pretrain(cfg, out)  # already at total_steps: no new fit, same export
    assert (again.step, again.checkpoint_path) == (6, second.checkpoint_path)
    assert read_metrics(out / "metrics.jsonl") == history
    with pytest.raises(ConfigError, match="different config"):
        pretrain(_cfg(tmp_path, "smoke", "objective.beta=2.0"), out)

    mlflow, runs = _mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [first.mlflow_run_id] == [second.mlflow_run_id]  # one run, continued
    run = runs[0]
    assert run.data.params["objective.name"] == "tagging_mixture" and run.data.params["train.total_steps"] == "6"
    assert run.data.tags["student_beats"] == str(second.student_path)
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [2, 3, 4, 6]
    assert run.info.run_name == "pretrain-smoke-seed0" and run.data.tags["kind"] == "pretrain"
    # Live from rank 0 as each report arrived: steps 2 and 3 were in MLflow before the first fit() returned and
    # its student was exported (not back-filled afterwards); lr and clips/s too.
    at = {m.step: m.timestamp for m in losses}
    assert at[2] < at[3] <= exported_first * 1000 < at[4] < at[6]
    assert {"lr", "clips_per_s"} <= set(run.data.metrics)
    # the validation curve beside the loss: one point per validation step (2, 4, 6), on the validation sets
    validation = client.get_metric_history(run.info.run_id, "val/hmean_low")
    assert sorted(m.step for m in validation) == [2, 4, 6] and all(0 <= m.value <= 1 for m in validation)
    assert [m["step"] for m in history if "val/hmean_low" in m] == [2, 4, 6]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "student_beats.pt"} <= artifacts

    # Its evaluation: the out folder means its student; one experiment, tagged with the pre-training run.
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.experiments import resolve_checkpoints

    ecfg = _cfg(tmp_path, "smoke", "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2",
                "eval.test_anomaly=2", "eval.snrs_db=[-5.0, 5.0]", "eval.conditions=[factory_a]")
    (scored,) = evaluate_from_config(ecfg, resolve_checkpoints(ecfg, [str(out)], tmp_path / "eval"), tmp_path / "eval")
    _, runs = _mlflow_runs(tmp_path)
    ev = next(r for r in runs if r.data.tags.get("kind") == "evaluate")
    assert ev.data.tags["pretrain_run_id"] == run.info.run_id and ev.data.tags["frozen"] == "false"
    assert ev.info.run_name == "evaluate-smoke-seed0" and ev.data.tags["preset"] == "smoke"
    assert set(ev.data.params) == set(run.data.params)  # the same flattened config keys
    assert ev.data.params["objective.alpha"] == run.data.params["objective.alpha"]
    assert ev.data.metrics["factory_a/snr_-5/official"] == scored.metrics()["factory_a/snr_-5/official"]
