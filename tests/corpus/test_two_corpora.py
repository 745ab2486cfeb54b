"""The paper's controlled protocol in the config (Sec. 4.1): a pre-training corpus (data.*) and a disjoint
evaluation corpus (eval.*), each ingested into its own folder; eval sets only from the evaluation corpus; the
training stream only from the pre-training corpus; the leakage guard in every entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retain_asd.config import ConfigError, load_config
from retain_asd.corpus import ingest as ingest_mod
from retain_asd.corpus.protocol import CorpusOverlapError


def _cfg(work: Path, worlds: list[str], *more: str):
    return load_config("smoke", overrides=[f"data.work_dir={work}", *worlds,
                                           f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", *more])


def test_config_defaults_name_two_corpora_and_zero_padding():
    cfg = load_config()
    assert (cfg.data.machine_root, cfg.data.noise_root, cfg.eval.machine_root, cfg.eval.noise_root) == ("",) * 4
    assert cfg.data.pad_mode == "zero" and cfg.data.add_eval_references is False
    assert len(cfg.data.synth_machines) >= 5 and len(cfg.data.synth_noise) == 4  # the pre-training world
    assert not set(cfg.data.synth_machines) & set(cfg.eval.synth_machines)
    assert not set(cfg.data.synth_noise) & set(cfg.eval.synth_noise)
    with pytest.raises(ConfigError, match="data.pad_mode"):
        load_config(overrides=["data.pad_mode=mirror"])
    assert load_config(overrides=["data.pad_mode=repeat"]).data.pad_mode == "repeat"


def test_empty_roots_write_the_two_synthetic_worlds(tmp_path):
    cfg = load_config(overrides=[f"data.work_dir={tmp_path}", "data.synth_machines=[pump]",
                                 "data.synth_noise=[brown_fan]", "eval.synth_machines=[slider]",
                                 "eval.synth_noise=[transformer, passby]", "data.clip_s=2.0", "eval.source_refs=6",
                                 "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2"])
    pre, ev = ingest_mod.pretrain_roots(cfg), ingest_mod.eval_roots(cfg)
    assert pre.synthetic and ev.synthetic and pre.machine_root != ev.machine_root
    assert sorted(p.name for p in Path(pre.machine_root, "dev_data/raw").iterdir()) == ["pump"]
    assert sorted(p.name for p in Path(ev.machine_root, "dev_data/raw").iterdir()) == ["slider"]
    import yaml

    roles = yaml.safe_load(Path(ev.noise_root, "categories.yaml").read_text())
    assert roles == {"transformer": {"stationary": True}, "passby": {"stationary": False}}  # Factory A / B
    assert ingest_mod.check_protocol(cfg).counts() == {"machine_type": 0, "clip": 0, "noise": 0}
    bad = load_config(overrides=[f"data.work_dir={tmp_path}", "eval.synth_machines=[fan]"])
    with pytest.raises(ConfigError, match="eval.synth_machines"):  # a pre-training type in the eval world
        ingest_mod.eval_roots(bad)


def test_each_corpus_has_its_own_shards_and_the_eval_sets_read_only_the_eval_corpus(ray_local, tmp_path,
                                                                                      small_worlds):
    from retain_asd.eval.evalsets import evalsets_from_config

    cfg = _cfg(tmp_path, small_worlds, "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2",
               "eval.test_anomaly=2")
    pre, ev, report = ingest_mod.corpora_from_config(cfg)
    assert (pre.root.name, ev.root.name) == ("corpus_pretrain", "corpus_eval") and not report
    assert (pre.root / "machine/manifest.json").is_file() and (ev.root / "machine/manifest.json").is_file()
    assert {s["machine"] for s in pre.machine.manifest["sources"]} == {"fan"}
    assert {s["machine"] for s in ev.machine.manifest["sources"]} == {"bearing"}
    sets = evalsets_from_config(cfg)
    assert Path(sets.manifest["corpus_root"]) == ev.root
    recipes = sets.table.to_pylist()
    assert {r["machine"] for r in recipes} == {"bearing"}
    eval_ids = {s["path"] for s in ev.machine.manifest["sources"]}
    assert eval_ids and not eval_ids & {s["path"] for s in pre.machine.manifest["sources"]}
    cats = {r["condition"]: r["noise_category"] for r in recipes if r["noise_category"]}
    assert cats["factory_a"] == "hvac" and cats["factory_b"] == "hammering"  # stationary / non-stationary


def test_one_epoch_of_the_real_stream_holds_no_clip_or_noise_of_the_eval_corpus(ray_local, tmp_path,
                                                                                 small_worlds):
    from retain_asd import stream
    from retain_asd.corpus.shards import read_table
    from retain_asd.train.loop_config import snr_sampler_args

    def epoch_ids(cfg):
        pre, ev, _ = ingest_mod.corpora_from_config(cfg)
        ds = stream.build_train_dataset(pre.machine.root, pre.noise.root, pre.labels_path,
                                        snr_sampler=snr_sampler_args(cfg.mixing), seed=0, num_epochs=1)
        rows = ds.select_columns(["clip_id", "noise_id"]).take_all()
        eval_clips = set(read_table(ev.machine.root, columns=["path", "clip_id"]).column("clip_id").to_pylist())
        eval_noise = set(read_table(ev.noise.root, columns=["path", "clip_id"]).column("clip_id").to_pylist())
        return pre, rows, eval_clips, eval_noise

    cfg = _cfg(tmp_path / "a", small_worlds)
    pre, rows, eval_clips, eval_noise = epoch_ids(cfg)
    train_ids = {s["sha1"][:16] for s in pre.machine.manifest["sources"] if s["split"] == "train"}
    assert len(rows) == len(train_ids) and {r["clip_id"] for r in rows} <= train_ids  # one full epoch
    assert not {r["clip_id"] for r in rows} & eval_clips
    assert not {r["noise_id"] for r in rows} & eval_noise
    # the control: with the eval references added on purpose, they (and the eval noise) are in the stream
    _, rows, eval_clips, eval_noise = epoch_ids(_cfg(tmp_path / "b", small_worlds, "data.add_eval_references=true"))
    assert {r["clip_id"] for r in rows} & eval_clips and {r["noise_id"] for r in rows} & eval_noise


# ---------------------------------------------------------------------------------------------------- guard
def _overlapping(tmp_path: Path, small_worlds: list[str], what: str) -> tuple[list[str], Path, Path]:
    """Copies of the small worlds where the pre-training corpus holds one evaluation file under another name:
    a train-split machine clip (`what` = "clip") or a noise recording ("noise"). Returns (overrides,
    pre-training copy, evaluation original)."""
    roots = dict(o.split("=", 1) for o in small_worlds)
    pre_root = tmp_path / "pre"
    shutil.copytree(Path(roots["data.machine_root"]), pre_root / "machines")
    shutil.copytree(Path(roots["data.noise_root"]), pre_root / "noise")
    if what == "clip":
        original = sorted(Path(roots["eval.machine_root"]).rglob("section_00_source_train_normal_*.wav"))[0]
        fan = sorted((pre_root / "machines").rglob("section_00_source_train_normal_*.wav"))[0]
        copy = fan.with_name(fan.name.replace("_0000_", "_0999_"))
    else:
        original = sorted(Path(roots["eval.noise_root"]).rglob("hvac_*.wav"))[0]
        copy = pre_root / "noise" / "pink_hum" / "pink_hum_0999.wav"
    shutil.copyfile(original, copy)
    overrides = [f"data.machine_root={pre_root / 'machines'}", f"data.noise_root={pre_root / 'noise'}",
                 f"eval.machine_root={roots['eval.machine_root']}", f"eval.noise_root={roots['eval.noise_root']}"]
    return overrides, copy, original


@pytest.mark.parametrize("what", ["clip", "noise"])
def test_every_entry_point_refuses_overlapping_corpora_before_any_work(tmp_path, small_worlds, capsys, what):
    from pipelines import evalsets, evaluate, pretrain, sweep

    overrides, copy, original = _overlapping(tmp_path, small_worlds, what)
    work = tmp_path / "work"
    common = [f"data.work_dir={work}", *overrides]
    commands = {
        "pretrain": lambda: pretrain.main(["--preset", "smoke", "--out", str(tmp_path / "run"), *common]),
        "evaluate": lambda: evaluate.main(["--preset", "smoke", "--checkpoint", "frozen", "--out",
                                           str(tmp_path / "ev"), *common]),
        "evalsets": lambda: evalsets.main(["--preset", "smoke", *common]),
        "sweep": lambda: sweep.main(["--preset", "smoke", "--out", str(tmp_path / "sw"), *common]),
    }
    for name, run in commands.items():
        assert run() == 2, name
        err = capsys.readouterr().err
        assert str(copy.resolve()) in err and str(original.resolve()) in err, (name, err)
        assert "data.add_eval_references: true" in err  # the fix
        kind = "1 shared clip(s)" if what == "clip" else "1 shared noise recording(s)"
        assert kind in err
        assert not any(work.glob("corpus_*")) and not (tmp_path / "run").exists(), name  # nothing ingested


def test_the_overlap_is_caught_by_content_even_renamed_and_test_clips_stay_refused(tmp_path, small_worlds):
    overrides, copy, _ = _overlapping(tmp_path, small_worlds, "clip")
    cfg = load_config(overrides=[f"data.work_dir={tmp_path / 'w'}", *overrides])
    with pytest.raises(CorpusOverlapError) as err:
        ingest_mod.check_protocol(cfg)
    assert err.value.report.counts() == {"machine_type": 0, "clip": 1, "noise": 0}
    allowed = load_config(overrides=[f"data.work_dir={tmp_path / 'w'}", *overrides, "data.add_eval_references=true"])
    assert ingest_mod.check_protocol(allowed).counts()["clip"] == 1
    roots = dict(o.split("=", 1) for o in small_worlds)
    test_clip = sorted(Path(roots["eval.machine_root"]).rglob("section_00_source_test_normal_*.wav"))[0]
    shutil.copyfile(test_clip, copy.with_name(copy.name.replace("_0999_", "_0998_")))
    with pytest.raises(CorpusOverlapError, match="evaluation test clip"):  # never a reference
        ingest_mod.check_protocol(allowed)


def test_add_eval_references_runs_and_records_the_setting(ray_local, tmp_path, small_worlds, capsys):
    import mlflow
    import yaml

    from pipelines.pretrain import main

    overrides, _, _ = _overlapping(tmp_path, small_worlds, "clip")
    db = tmp_path / "mlflow.db"
    argv = ["--preset", "smoke", "--out", str(tmp_path / "run"), f"data.work_dir={tmp_path / 'work'}", *overrides,
            f"tracking.tracking_uri=sqlite:///{db}", "train.total_steps=2", "train.warmup_steps=1",
            "train.checkpoint_every=2", "data.add_eval_references=true"]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(argv) == 0
    assert "adds the evaluation references and noise on purpose" in capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["add_eval_references"] is True
    corpus = tmp_path / "work" / "corpus_pretrain_evalrefs"
    labels = (corpus / "labels.json").read_text()
    assert "bearing" in labels and "noise_hvac" in labels  # the eval references and noise joined pre-training
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    (run,) = mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")
    params = run.data.params
    assert params["data.add_eval_references"] == "True"
    assert int(params["protocol.overlap_clip"]) >= 1 and params["protocol.shared_machine_types"] == "bearing"
