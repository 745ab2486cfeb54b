"""Search spaces as data: the sweep's axes come from ``TuneConfig`` (SNR ranges, alpha, beta), and a trial's
choices become ordinary config overrides, so a trial's config is validated like any other."""

from __future__ import annotations

from typing import Any

from retain_asd.config import Config, TuneConfig, from_dict, to_dict


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

    t = base.tune
    points = list(product(t.snr_ranges_db, t.alphas, t.betas))
    for snr_range, alpha, beta in points:
        choices = {"snr_range_db": list(snr_range), "alpha": alpha, "beta": beta}
        try:
            trial_config(base, choices, name=f"{base.name}-check")
        except ConfigError as err:
            raise ConfigError(f"sweep point {choices}: {err}") from None
    return len(points)
