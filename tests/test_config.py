"""Config: paper defaults, strict YAML in/out, presets, field-naming errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from retain_asd.config import (
    Config,
    ConfigError,
    dump_yaml,
    from_dict,
    list_presets,
    load_config,
    to_dict,
)

TABLE2 = ["frozen", "denoise", "denoise_linear_mixup", "denoise_snr_mixup", "tagging_pm5", "mixture_pm5",
          "tagging_mixture_pm5", "tagging_0db", "mixture_0db", "tagging_mixture_0db"]


def test_paper_defaults():
    cfg = Config()
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.total_steps) == (
        1e-4, 1e-3, 200, 20000)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.class_weighted) == (64, 2, True)
    assert (cfg.mixing.snr_sampler, cfg.mixing.snr_low_db, cfg.mixing.snr_high_db) == ("uniform", -5.0, 5.0)
    assert (cfg.objective.lam, cfg.objective.alpha, cfg.objective.beta) == (0.5, 1.0, 1.0)
    assert cfg.eval.snrs_db == (-10.0, -5.0, 0.0, 5.0, 10.0, 20.0, 30.0)
    assert (cfg.eval.layer, cfg.eval.k, cfg.eval.source_refs, cfg.eval.target_refs) == (6, 1, 990, 10)


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = load_config("smoke", overrides=["train.lr=3e-4", "mixing.snr_values_db=[-5, 0, 5]"])
    path = dump_yaml(cfg, tmp_path / "config.yaml")
    again = load_config(path=path)
    assert again == cfg
    assert again.mixing.snr_values_db == (-5.0, 0.0, 5.0)
    assert to_dict(again) == yaml.safe_load(path.read_text())


def test_every_table2_row_and_smoke_is_a_preset():
    assert set(TABLE2 + ["smoke"]) <= set(list_presets())
    names = {p: load_config(p).objective.name for p in TABLE2}
    assert names["denoise_snr_mixup"] == "snr_mixup" and names["frozen"] == "frozen"
    assert load_config("tagging_0db").mixing.snr_sampler == "fixed"
    assert load_config("mixture_pm5").objective.alpha == 0.0
    assert load_config("frozen").eval.layer == 12


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in 'train'; allowed keys: lr, weight_decay"):
        from_dict({"train": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'trian' at the top level"):
        from_dict({"trian": {}})


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1e-4", "train.lr"),
    ("objective.lam=1.5", "objective.lam"),
    ("mixing.snr_low_db=6", "mixing.snr_low_db"),
    ("train.warmup_steps=30000", "train.warmup_steps"),
    ("objective.name=denoising", "objective.name"),
    ("train.batch_size=three", "train.batch_size"),
    ("train.class_weighted=1", "train.class_weighted"),
    ("train.compile=fast", "train.compile"),
    ("eval.conditions=[factory_c]", "eval.conditions"),
    ("train.resource_wait_s=0", "train.resource_wait_s"),
    ("train.resource_wait_s=.inf", "train.resource_wait_s"),
    ("eval.synth_noise_spread=0", "eval.synth_noise_spread"),
    ("eval.synth_noise_spread=.nan", "eval.synth_noise_spread"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path=bad)
    bad.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'epochs'"):
        load_config(path=bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(path=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: "):
        load_config("nope")


def test_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_config_show_cli(capsys):
    from pipelines.cli import main

    assert main(["config", "show", "tagging_0db", "train.lr=2e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "tagging_0db" and shown["train"]["lr"] == 2e-4
    assert shown["mixing"]["snr_sampler"] == "fixed"
    assert main(["config", "show", "smoke", "train.lr=0"]) == 2
    assert "train.lr = 0.0: must be > 0" in capsys.readouterr().err


def test_choice_lists_have_one_home():
    from retain_asd import choices, config, mixing
    from retain_asd.eval import evalsets
    from retain_asd.models import registry
    from retain_asd.train import objectives

    assert objectives.OBJECTIVES is choices.OBJECTIVES and objectives.LAM_MODES is choices.LAM_MODES
    assert objectives.TEACHER_INPUTS is choices.TEACHER_INPUTS and mixing.SNR_SAMPLERS is choices.SNR_SAMPLERS
    assert evalsets.CONDITIONS is choices.CONDITIONS and choices.ENCODER_FAMILIES == tuple(registry.FAMILIES)
    for name in choices.OBJECTIVES:
        objectives.objective_terms(name)  # every configurable objective has its terms
    assert config.load_config("smoke", overrides=["eval.conditions=[mismatch]"]).eval.conditions == ("mismatch",)
    with pytest.raises(config.ConfigError, match=r"eval.conditions = \('factory_c',\): must be a non-empty subset"):
        config.load_config("smoke", overrides=["eval.conditions=[factory_c]"])


def test_ssl_baseline_layer_is_a_field():
    assert Config().eval.ssl_layer == 12 and Config().eval.layer == 6
    assert load_config("smoke", overrides=["eval.ssl_layer=3"]).eval.ssl_layer == 3
    with pytest.raises(ConfigError, match="eval.ssl_layer"):
        load_config("smoke", overrides=["eval.ssl_layer=0"])


def test_placement_strategy_is_one_of_rays():
    assert load_config("smoke").train.placement_strategy == "PACK"
    spread = load_config("smoke", overrides=["train.placement_strategy=STRICT_SPREAD"])
    assert spread.train.placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ConfigError, match=r"train.placement_strategy = 'EVERYWHERE': must be one of \['PACK'"):
        load_config("smoke", overrides=["train.placement_strategy=EVERYWHERE"])
