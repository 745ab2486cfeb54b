"""Ray Tune around the library's experiment point: one trial = `retain_asd.experiments.run_point` (pre-train a
student with the trial's SNR range and alpha/beta, score it on the eval sets), reporting the Table-2 harmonic means.

Three layers as in Ray's train/tune interop example: the loop (retain_asd.train.loop) runs per worker,
``pretrain`` builds the TorchTrainer, and the Tuner below runs one experiment point per trial. Trial folders
come from trial ids and run names from the trial's choices (no timestamps), so a restarted sweep resumes its
trials. ``tune.search = grid`` (default) runs every point of the grid exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retain_asd.config import Config, from_dict, to_dict
from retain_asd.tracking import ensure_experiment, resolve_tracking_uri
from tune.space import check_trials, search_space, trial_config, trial_name

log = logging.getLogger(__name__)

REPORTED = ("hmean_all", "hmean_low", "hmean_all_dn", "hmean_low_dn")


def run_trial(choices: dict[str, Any], *, base: dict, corpus_root: str, out_dir: str, uri: str) -> None:
    """Tune function trainable: one experiment point (`retain_asd.experiments.run_point`) for one choice of
    (SNR range, alpha, beta), in ``<out>/trials/<trial id>`` (a restarted trial resumes there).

    The point's MLflow run is named after its choices and tagged with the trial id, in the sweep's experiment,
    with its pre-training and evaluation runs nested; its Table-2 hmeans are reported to Tune.
    """
    from ray import tune

    from retain_asd.corpus.ingest import load_corpus
    from retain_asd.experiments.point import run_point

    trial_id = tune.get_context().get_trial_id()
    name = trial_name(base["name"], choices)
    cfg = trial_config(from_dict(base), choices, name=name)
    point = run_point(cfg, Path(out_dir) / "trials" / trial_id, tracking_uri=uri, tags={"trial_id": trial_id},
                      corpus=load_corpus(corpus_root))
    tune.report({k: v for k, v in point.figures.items() if k in REPORTED} | {"step": point.steps})


# A trial only drives a TorchTrainer: it holds no CPU, or the workers (0.5 CPU each) plus Ray Data's read
# tasks (1 CPU each) would not fit on a 2-CPU machine. Ray needs a non-empty bundle: reserve memory instead.
TRIAL_RESOURCES = {"CPU": 0.0, "memory": 256 * 1024**2}


def sweep_experiment(cfg: Config) -> str:
    """The MLflow experiment of a sweep: every trial's run, its pre-training and evaluation runs."""
    return f"{cfg.tracking.experiment}-sweep"


def _search(cfg: Config):
    """(search algorithm, num_samples, max_concurrent_trials) for ``tune.search``; the concurrency goes to the
    one place Ray honours it (Tune's ConcurrencyLimiter for a searcher, else the variant generator)."""
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    if t.search == "grid":
        return None, 1, t.max_concurrent  # Ray's own variant generator: each grid point once
    if t.search == "random":
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=t.max_concurrent), t.num_samples, None
    try:
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.train.seed)
    except (ImportError, AssertionError) as err:
        raise ValueError(f"tune.search = optuna needs the optuna package ({err}); pip install optuna, or use "
                         "tune.search=grid / random") from None
    return searcher, t.num_samples, t.max_concurrent


def run_sweep(cfg: Config, out_dir: str | Path, *, trial_resources: dict | None = None):
    """Run the sweep of ``cfg.tune`` and return the ResultGrid (best trial by ``cfg.tune.metric``)."""
    from ray import tune

    from retain_asd.corpus.ingest import check_protocol, corpora_from_config
    from retain_asd.eval.evalsets import evalsets_from_config

    check_trials(cfg)  # every trial's config, before any work
    check_protocol(cfg)  # the leakage guard on the raw folders, before any Ray work
    out_dir = Path(out_dir).resolve()
    corpus, _, _ = corpora_from_config(cfg)  # once, on the driver: trials only read the pre-training corpus
    evalsets_from_config(cfg)  # built once and cached; trials reuse them
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    experiment = sweep_experiment(cfg)
    ensure_experiment(uri, experiment, cfg.data.storage)  # trials need it to exist
    base = to_dict(cfg)
    base["tracking"] = {**base["tracking"], "tracking_uri": uri, "experiment": experiment}
    trainable = tune.with_parameters(run_trial, base=base, corpus_root=str(corpus.root), out_dir=str(out_dir),
                                     uri=uri)
    trainable = tune.with_resources(trainable, trial_resources or TRIAL_RESOURCES)
    where = sweep_storage(cfg, out_dir)
    previous = f"{where['storage_path']}/{cfg.name}-sweep"
    fs = where.get("storage_filesystem")
    if tune.Tuner.can_restore(previous, storage_filesystem=fs):  # a restarted sweep resumes its unfinished trials
        log.info("resuming the sweep in %s", previous)
        return tune.Tuner.restore(previous, trainable, resume_errored=True, storage_filesystem=fs).fit()
    searcher, num_samples, concurrent = _search(cfg)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max", num_samples=num_samples,
                                    max_concurrent_trials=concurrent, search_alg=searcher),
        run_config=tune.RunConfig(name=f"{cfg.name}-sweep", **where),
    )
    return tuner.fit()


def sweep_storage(cfg: Config, out_dir: str | Path) -> dict:
    """Tune's storage_path (+ storage_filesystem) for the sweep's experiment state: ``<out>/ray``, or with
    data.storage the bucket, beside the trials' checkpoints (``<data.storage>/runs/<out folder name>``), so a
    sweep restarted on another machine resumes from the bucket."""
    from retain_asd import storage
    from retain_asd.train.launch import checkpoint_root

    return storage.ray_storage(checkpoint_root(cfg, out_dir))


def write_best_config(grid, cfg: Config, path: str | Path) -> Path | None:
    """The best trial's config (by ``tune.metric``) as a preset file, for ``--config PATH``; None when no trial
    reported the metric."""
    from retain_asd.config import dump_yaml

    ranked = [r for r in grid if r.error is None and isinstance((r.metrics or {}).get(cfg.tune.metric), int | float)]
    if not ranked:
        return None
    best = max(ranked, key=lambda r: r.metrics[cfg.tune.metric])
    choices = {k: best.config[k] for k in ("snr_range_db", "alpha", "beta")}
    return dump_yaml(trial_config(cfg, choices, name=trial_name(cfg.name, choices)), path)


# ---------------------------------------------------------------------------------------------------- summary
def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    name = Path(str(result.path)).name if result.path else "?"  # run_trial_<id>_<n>_<choices>_<date>
    parts = name.split("_")
    return "_".join(parts[2:4]) if name.startswith("run_trial_") and len(parts) > 3 else name


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def summarize_sweep(grid, metric: str) -> tuple[str, int]:
    """(text, exit code) of a finished sweep: every trial with its status, choices and figures; the best
    trial by ``metric``; exit code 1 when any trial failed (and a clear line when all of them did)."""
    rows, failed = [], []
    for result in grid:
        m = result.metrics or {}
        if result.error is not None:
            status = "ERROR"
            failed.append((_trial_id(result), _last_line(result.error)))
        else:
            status = "OK" if metric in m else "NO RESULT"
        choices = result.config or {}
        figures = "  ".join(f"{k}={m[k]:.4f}" for k in REPORTED if isinstance(m.get(k), int | float))
        rows.append((_trial_id(result), status, choices, figures))
    lines = [f"{'trial':<14} {'status':<9} choices / figures"]
    lines += [f"{tid:<14} {status:<9} {choices}  {figures}".rstrip() for tid, status, choices, figures in rows]
    ranked = [r for r in grid if r.error is None and isinstance((r.metrics or {}).get(metric), int | float)]
    if not rows:
        lines.append("the sweep ran no trials")
        return "\n".join(lines), 1
    if ranked:
        best = max(ranked, key=lambda r: r.metrics[metric])
        lines.append(f"best {metric} = {best.metrics[metric]:.4f} with {best.config}")
    if failed and len(failed) == len(rows):
        lines.append(f"all {len(rows)} trials failed; nothing to rank. First error ({failed[0][0]}): {failed[0][1]}")
    elif failed:
        lines.append(f"{len(failed)} of {len(rows)} trials failed:")
    if failed and len(failed) < len(rows):
        lines += [f"  {tid}: {why}" for tid, why in failed]
    elif not ranked and not failed:
        lines.append(f"no trial reported {metric}")
    code = 1 if failed or not ranked else 0
    return "\n".join(lines), code
