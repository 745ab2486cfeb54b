"""Issue 9, item 6: the paper's details as settings, one test per bullet (padding, Eq. 7, DN primary, MemMixup,
test-split normals, Table-4 and Table-5 presets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retain_asd.config import OBJECTIVE_WEIGHTS, ConfigError, list_presets, load_config


# ---------------------------------------------------------------------------------------------------- padding
def test_zero_padding_is_the_default_and_repeat_a_setting(tmp_path):
    from retain_asd.audio import load_clip, write_audio
    from retain_asd.corpus.ingest import decode_settings

    assert decode_settings(load_config().data).pad_mode == "zero"  # paper Sec. 4.2
    settings = decode_settings(load_config(overrides=["data.pad_mode=repeat", "data.clip_s=2.0"]).data)
    assert settings.pad_mode == "repeat"
    x = np.linspace(-0.5, 0.5, 16000, dtype=np.float32)  # 1 s, padded to 2 s
    write_audio(tmp_path / "short.wav", x, 16000)
    zero = load_clip(tmp_path / "short.wav", clip_s=2.0, pad_mode="zero").samples
    rep = load_clip(tmp_path / "short.wav", clip_s=2.0, pad_mode=settings.pad_mode).samples
    assert np.all(zero[16000:] == 0) and np.allclose(rep[16000:], rep[:16000])


# ---------------------------------------------------------------------------------------------------- Eq. 7
def test_eq7_is_the_only_weighting_rule():
    from retain_asd.train import objectives as obj

    tag, mix = torch.tensor(2.0), torch.tensor(3.0)
    assert obj.combined_loss(tag, None, alpha=0.5, beta=0.0).total.item() == 1.0  # alpha L_tag
    assert obj.combined_loss(None, mix, alpha=0.0, beta=2.0).total.item() == 6.0  # beta L_mix
    assert obj.combined_loss(None, None, 0.25, 0.0, denoise=tag).total.item() == 0.5  # alpha L_denoise
    assert obj.combined_loss(tag, mix, alpha=1.0, beta=1.0).total.item() == 5.0


@pytest.mark.parametrize(("objective", "bad", "field"), [
    ("tagging", "objective.beta=1.0", "objective.beta"), ("denoise", "objective.beta=0.5", "objective.beta"),
    ("mixture", "objective.alpha=1.0", "objective.alpha"), ("frozen", "objective.alpha=1.0", "objective.alpha"),
])
def test_a_weight_the_objective_cannot_use_is_a_config_error_naming_the_field(objective, bad, field):
    ok = {"alpha": 1.0 if "alpha" in OBJECTIVE_WEIGHTS[objective] else 0.0,
          "beta": 1.0 if "beta" in OBJECTIVE_WEIGHTS[objective] else 0.0}
    load_config(overrides=[f"objective.name={objective}", f"objective.alpha={ok['alpha']}",
                           f"objective.beta={ok['beta']}"])
    with pytest.raises(ConfigError, match=rf"{field} = .*unused; set {field}: 0"):
        load_config(overrides=[f"objective.name={objective}", f"objective.alpha={ok['alpha']}",
                               f"objective.beta={ok['beta']}", bad])
    with pytest.raises(ConfigError, match="zero loss"):
        load_config(overrides=["objective.name=tagging_mixture", "objective.alpha=0", "objective.beta=0"])


def test_every_preset_loads_and_names_its_weights():
    for name in list_presets():
        cfg = load_config(name)  # validate_weights runs on each
        o = cfg.objective
        assert (o.alpha > 0) == ("alpha" in OBJECTIVE_WEIGHTS[o.name]) and (o.beta > 0) == (
            "beta" in OBJECTIVE_WEIGHTS[o.name]), name
    assert (load_config("tagging_pm5").objective.alpha, load_config("tagging_pm5").objective.beta) == (1.0, 0.0)
    assert (load_config("mixture_pm5").objective.alpha, load_config("mixture_pm5").objective.beta) == (0.0, 1.0)


# ---------------------------------------------------------------------------------------------------- DN primary
def _result(primary: str):
    from retain_asd.eval.results import Cell, EvalResult

    cells = []
    for condition in ("factory_a", "factory_b", "mismatch"):
        for snr in (-10.0, -5.0, 0.0, 5.0):
            cells.append(Cell(condition, snr, 2, False, {}, 0.6))
            cells.append(Cell(condition, snr, 2, True, {}, 0.8))
    return EvalResult("ckpt", "h", 2, cells, primary=primary)


def test_both_figures_are_computed_and_the_primary_is_labelled(tmp_path):
    from retain_asd.eval.run import write_reports

    assert load_config().eval.primary == "dn"
    with pytest.raises(ConfigError, match="eval.primary"):
        load_config(overrides=["eval.primary=both"])
    dn, raw = _result("dn").metrics(), _result("raw").metrics()
    assert dn["hmean_all"] == pytest.approx(0.6) and dn["hmean_all_dn"] == pytest.approx(0.8)  # both, always
    assert dn["hmean_all_primary_dn"] == pytest.approx(0.8) and "hmean_all_primary_raw" not in dn
    assert raw["hmean_all_primary_raw"] == pytest.approx(0.6) and raw["hmean_low_primary_raw"] == pytest.approx(0.6)
    assert raw["factory_a/hmean_all_primary_raw"] == pytest.approx(0.6)
    write_reports([_result("dn")], tmp_path / "dn")
    assert (tmp_path / "dn/table2_dn.md").read_text().startswith("| run (DN, primary) |")
    assert (tmp_path / "dn/table2.md").read_text().startswith("| run (raw) |")
    write_reports([_result("raw")], tmp_path / "raw")
    assert (tmp_path / "raw/table2.md").read_text().startswith("| run (raw, primary) |")
    assert (tmp_path / "raw/table2_dn.csv").read_text().startswith("run (DN),")


# ---------------------------------------------------------------------------------------------------- MemMixup
def test_memmixup_k_and_ratio_are_config_values_and_change_the_scores():
    from retain_asd.eval.results import score_machine

    cfg = load_config(overrides=["eval.memmixup=true", "eval.memmixup_k=3", "eval.memmixup_ratio=0.6"])
    assert (cfg.eval.memmixup_k, cfg.eval.memmixup_ratio) == (3, 0.6)
    with pytest.raises(ConfigError, match="eval.memmixup_ratio"):
        load_config(overrides=["eval.memmixup_ratio=1.5"])
    rng = np.random.default_rng(0)
    # tests near the few target references, far from the source ones: the (mixed) target bank decides
    src, tgt, test = rng.normal(size=(20, 8)), rng.normal(4.0, 0.3, size=(3, 8)), rng.normal(3.5, 0.5, size=(8, 8))
    labels, domains = [False, True] * 4, [False] * 4 + [True] * 4
    names, sections = [f"t{i}" for i in range(8)], ["00"] * 8

    def scores(k, ratio):
        return score_machine("m", src, tgt, test, labels, domains, names, sections, 1, "euclidean", False,
                             memmixup=k, memmixup_ratio=ratio, threshold=False).scores

    assert not np.allclose(scores(3, 0.6), scores(3, 0.9)) and not np.allclose(scores(1, 0.6), scores(5, 0.6))
    assert not np.allclose(scores(0, 0.9), scores(3, 0.9))


# ---------------------------------------------------------------------------------------------------- test normals
def test_test_split_normals_can_join_pre_training(ray_local, tmp_path, small_worlds):
    from retain_asd.corpus.ingest import pretrain_corpus_from_config

    base = [f"data.work_dir={tmp_path}", *small_worlds]
    plain = pretrain_corpus_from_config(load_config(overrides=base))
    more = pretrain_corpus_from_config(load_config(overrides=[*base, "data.include_test_normals=true"]))
    assert more.root.name == "corpus_pretrain_testnormals" and plain.root.name == "corpus_pretrain"

    def train(c):
        return {(s["path"], s["split"]) for s in c.machine.manifest["sources"] if s["split"] == "train"}

    added = train(more) - train(plain)
    assert len(added) == 4 and all("_test_normal_" in p for p, _ in added)  # 2 domains x 2 normals, no anomaly


# ---------------------------------------------------------------------------------------------------- presets
def test_table4_presets_tagging_at_fixed_and_ranged_snrs():
    fixed = {10.0: "tagging_10db", 5.0: "tagging_5db", 0.0: "tagging_0db", -5.0: "tagging_m5db",
             -10.0: "tagging_m10db"}
    for snr, name in fixed.items():
        cfg = load_config(name)
        assert (cfg.objective.name, cfg.objective.alpha, cfg.objective.beta) == ("tagging", 1.0, 0.0)
        assert (cfg.mixing.snr_sampler, cfg.mixing.snr_db) == ("fixed", snr)
    for half, name in ((5.0, "tagging_pm5"), (10.0, "tagging_pm10")):
        m = load_config(name).mixing
        assert (m.snr_sampler, m.snr_low_db, m.snr_high_db) == ("uniform", -half, half)


def test_table5_presets_other_data_then_machine_data_then_eval_references(tmp_path):
    from retain_asd.corpus.ingest import check_protocol, pretrain_roots

    other, machine, evalref = (load_config(n).data for n in ("table5_other", "table5_machine", "table5_evalref"))
    assert other.synth_machines == () and other.synth_generic_per_family > 0 and not other.add_eval_references
    assert len(machine.synth_machines) >= 5 and machine.synth_generic_per_family == other.synth_generic_per_family
    assert evalref.add_eval_references and evalref.synth_generic_per_family == other.synth_generic_per_family
    # the "other data" corpus is generic sounds only (no machine type), with the pre-training world's noise
    small = [f"data.work_dir={tmp_path}", "data.clip_s=1.0", "data.synth_generic_per_family=2",
             "data.synth_noise=[pink_hum]", "eval.synth_machines=[bearing]", "eval.synth_noise=[hvac, hammering]",
             "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2"]
    cfg = load_config("table5_other", overrides=small)
    roots = pretrain_roots(cfg)
    from pathlib import Path

    types = sorted(p.name for p in Path(roots.machine_root, "dev_data/raw").iterdir())
    assert types == ["as_bearing", "as_harmonic", "as_modulated", "as_noise", "as_rattle", "as_sweep"]
    assert len(list(Path(roots.machine_root).rglob("*.wav"))) == 12
    assert not check_protocol(cfg)  # no overlap with the evaluation world
