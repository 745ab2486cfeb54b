"""Search spaces as data: the sweep's axes come from ``TuneConfig`` (SNR ranges, alpha, beta), and a trial's
choices become ordinary config overrides, so a trial's config is validated like any other. A sweep's trials
always validate (`sweep_base`): they are selected, and with ``tune.scheduler = asha`` stopped early, on
``val/hmean_low``."""

from __future__ import annotations

import dataclasses
from typing import Any

from retain_asd.config import Config, TuneConfig, from_dict, to_dict

VALIDATION_POINTS = 10  # a sweep validates each trial this many times when train.validate_every is 0


def sweep_validate_every(cfg: Config) -> int:
    """Steps between validations in a sweep's trials: ``train.validate_every`` when set, else
    ``train.total_steps // VALIDATION_POINTS`` (at least 1): ten validation points per trial."""
    return cfg.train.validate_every or max(1, cfg.train.total_steps // VALIDATION_POINTS)


def sweep_base(cfg: Config) -> Config:
    """The config every trial starts from: `cfg` with ``train.validate_every`` on (`sweep_validate_every`), since
    a sweep selects its best trial (and ASHA stops trials) on the validation figure ``val/hmean_low``."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, validate_every=sweep_validate_every(cfg)))


def grace_steps(cfg: Config) -> int:
    """``tune.grace_period`` (in validation points) as optimiser steps: the first step ASHA may stop a trial at."""
    return cfg.tune.grace_period * sweep_validate_every(cfg)


def axes(tune_cfg: TuneConfig) -> dict[str, list]:
    """The swept quantities and their values."""
    return {"snr_range_db": [list(r) for r in tune_cfg.snr_ranges_db], "alpha": list(tune_cfg.alphas),
            "beta": list(tune_cfg.betas)}


def search_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """Ray Tune param space. ``tune.search = grid``: ``tune.grid_search`` axes, so every combination runs exactly
    once; ``random`` / ``optuna``: categorical axes that the search draws ``tune.num_samples`` points from."""
    from ray import tune

    make = tune.grid_search if tune_cfg.search == "grid" else tune.choice
    return {name: make(values) for name, values in axes(tune_cfg).items()}


def trial_name(base: str, choices: dict[str, Any]) -> str:
    """A trial's readable name (its runs, its row in `retain-asd compare`): ``<base>-snr<lo>_<hi>-a<alpha>-b<beta>``."""
    low, high = (float(x) for x in choices["snr_range_db"])
    return f"{base}-snr{low:g}_{high:g}-a{float(choices['alpha']):g}-b{float(choices['beta']):g}"


def trial_config(base: Config, choices: dict[str, Any], name: str) -> Config:
    """The base config with a trial's choices applied; a zero-width SNR range becomes the fixed sampler."""
    low, high = (float(x) for x in choices["snr_range_db"])
    values = to_dict(base)
    values["name"] = name
    values["objective"].update(alpha=float(choices["alpha"]), beta=float(choices["beta"]))
    if low == high:
        values["mixing"].update(snr_sampler="fixed", snr_db=low)
    else:
        values["mixing"].update(snr_sampler="uniform", snr_low_db=low, snr_high_db=high)
    return from_dict(values)


def check_trials(base: Config) -> int:
    """Validate the config of every point of the search space before any trial starts (a bad sweep value
    must fail in a second, not after hours of other trials). Returns the number of distinct points."""
    from itertools import product

    from retain_asd.config import ConfigError

    t, steps = base.tune, base.train.total_steps
    if t.scheduler == "asha" and grace_steps(base) >= steps:  # ASHA would never see a validation point to stop on
        raise ConfigError(f"tune.grace_period = {t.grace_period}: {t.grace_period} validation point(s) x "
                          f"{sweep_validate_every(base)} steps (train.validate_every) = {grace_steps(base)} steps, "
                          f"not before train.total_steps ({steps}), so ASHA could stop no trial; lower "
                          "tune.grace_period or train.validate_every, or use tune.scheduler=fifo")
    points = list(product(t.snr_ranges_db, t.alphas, t.betas))
    for snr_range, alpha, beta in points:
        choices = {"snr_range_db": list(snr_range), "alpha": alpha, "beta": beta}
        try:
            trial_config(base, choices, name=f"{base.name}-check")
        except ConfigError as err:
            raise ConfigError(f"sweep point {choices}: {err}") from None
    return len(points)
