"""Search spaces as data: the sweep's axes come from ``TuneConfig`` (SNR ranges, alpha, beta), and a trial's
choices become ordinary config overrides, so a trial's config is validated like any other."""

from __future__ import annotations

from typing import Any

from retain_asd.config import Config, TuneConfig, from_dict, to_dict


def search_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """Ray Tune param space: one categorical axis per swept quantity."""
    from ray import tune

    return {
        "snr_range_db": tune.choice([list(r) for r in tune_cfg.snr_ranges_db]),
        "alpha": tune.choice(list(tune_cfg.alphas)),
        "beta": tune.choice(list(tune_cfg.betas)),
    }


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

    t = base.tune
    points = list(product(t.snr_ranges_db, t.alphas, t.betas))
    for snr_range, alpha, beta in points:
        choices = {"snr_range_db": list(snr_range), "alpha": alpha, "beta": beta}
        try:
            trial_config(base, choices, name=f"{base.name}-check")
        except ConfigError as err:
            raise ConfigError(f"sweep point {choices}: {err}") from None
    return len(points)
