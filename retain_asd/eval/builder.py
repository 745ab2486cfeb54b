"""The config builder of the evaluation: a Config + resolved checkpoints -> `run.evaluate_checkpoint` (or the
DCASE-folder mode), score files, Table-2 reports and one MLflow run per checkpoint.

What pipelines/evaluate.py and an experiment point (`retain_asd.experiments.point.run_point`) call
(`evaluate_from_config`), after `retain_asd.experiments.resolve_checkpoints` has turned the --checkpoint values
into files. The library evaluation itself (`run.py`, `dcase_mode.py`) never reads a Config.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from retain_asd import fsio, storage
from retain_asd.eval.embed import Embedder
from retain_asd.eval.results import EvalResult
from retain_asd.eval.run import evaluate_checkpoint, write_reports, write_score_files


class ResolvedCheckpoint(NamedTuple):
    """A checkpoint ready to score: what `retain_asd.experiments.resolve_checkpoint` makes of a --checkpoint value
    (evaluation itself resolves nothing: "frozen" may mean training the stand-in foundation encoder first)."""

    name: str  # the row and run name
    path: str  # a local encoder .pt
    frozen: bool  # an initial encoder scored as an SSL baseline (eval.ssl_layer), not a student


SOURCE_URI = "source_uri.json"  # beside a fetched checkpoint: {"uri": where it was copied from}


def provenance(checkpoint: str | os.PathLike) -> dict:
    """What pre-training left beside a checkpoint: {"preset", "seed", "pretrain_run_id", "config"} from its
    config.yaml and MLflow run pointer (mlflow_run.json); {} for a checkpoint from elsewhere."""
    from retain_asd.config import ConfigError, load_config, to_dict
    from retain_asd.tracking import read_run_pointer

    folder = Path(checkpoint).parent
    if not (folder / "config.yaml").is_file():
        return {}
    try:
        cfg = load_config(path=folder / "config.yaml")
    except ConfigError as err:
        warnings.warn(f"{folder / 'config.yaml'}: not a config of this version ({err}); the run is named after "
                      "the file", stacklevel=2)
        return {}
    pointer = read_run_pointer(folder)
    source = fsio.read_json(folder / SOURCE_URI) if (folder / SOURCE_URI).is_file() else {}
    return {"preset": cfg.name, "seed": cfg.train.seed, "pretrain_run_id": pointer.get("run_id", ""),
            "config": to_dict(cfg), "extra_params": pointer.get("params", {}), "uri": source.get("uri", "")}


def check_checkpoints(resolved: Sequence[tuple[str, str, bool]], layer: int,
                      layers: Sequence[int] | None = None, family: str | None = None) -> dict[str, int]:
    """Open every checkpoint before any is used: {path: number of encoder layers}.

    A torn or foreign file raises BEATsCheckpointError naming it; ``eval.layer`` (students) and every extra
    ``layers`` entry must exist in each encoder (ConfigError naming the checkpoint and its depth).
    """
    from retain_asd.config import check_layer
    from retain_asd.models.encoders import load_encoder

    depths = {}
    for _, path, frozen in resolved:
        if path not in depths:
            depths[path] = load_encoder(path, family).num_layers
        if not frozen:  # the frozen baseline uses layer 12, clamped to a smaller encoder's depth
            check_layer(layer, depths[path], "eval.layer", path)
        for extra in layers or ():
            check_layer(extra, depths[path], "--layers", path)
    return depths


def embedding_cache_dir(cfg) -> Path | str:
    """``<data.work_dir>/embeddings``, or ``<data.storage>/embeddings`` (an object store) when data.storage is set."""
    return storage.join(cfg.data.storage, "embeddings") if cfg.data.storage else Path(cfg.data.work_dir) / "embeddings"


def evaluate_from_config(cfg, checkpoints: Sequence[ResolvedCheckpoint], out_dir: str | os.PathLike,
                         layers: Sequence[int] | None = None, use_ray: bool = False,
                         dcase_root: str | os.PathLike | None = None,
                         ground_truth_dir: str | os.PathLike | None = None, sets=None,
                         track: bool = True, channels: Sequence[str] | None = None,
                         tags: Mapping[str, str] | None = None) -> list[EvalResult]:
    """Builder: evaluate each resolved checkpoint on the config's eval sets (or a DCASE folder),
    write tables, plots and score files under `out_dir/<name>/`, and log one MLflow run per checkpoint
    (nested under the active run; its id in the result's ``run_id``).

    `sets`: built `EvalSets` to use instead of the config's; `track=False`: no MLflow run (the caller logs);
    `tags`: added to each run's tags (an experiment point's study or trial).
    `channels` (DCASE folder only; default [data.channel]): score each channel of the same clips, one result and
    run per checkpoint and channel (`<name>-ch<c>`), and `<out>/channels_<name>.md` side by side."""
    from retain_asd.eval.dcase_mode import (
        channels_side_by_side,
        evaluate_dcase,
        source_only,
        write_dcase_table,
    )
    from retain_asd.eval.evalsets import evalsets_from_config
    from retain_asd.tracking import (
        active_run_id,
        log_artifacts,
        log_metrics,
        mlflow_run,
        resolve_tracking_uri,
        run_name,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fsio.remove_stale_temps(out_dir, recursive=True)  # temp files of an evaluate that was killed
    e = cfg.eval
    resolved = _resolved(checkpoints)
    depths = check_checkpoints(resolved, e.layer, layers, cfg.model.family)  # a torn / foreign file, a missing layer
    if not dcase_root:
        from retain_asd.corpus.ingest import check_protocol

        check_protocol(cfg)  # the leakage guard (CorpusOverlapError), before any ingestion or Ray work
    if sets is None and not dcase_root:
        sets = evalsets_from_config(cfg)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    cache_dir = embedding_cache_dir(cfg)
    channels = [str(c) for c in (channels or [cfg.data.channel])] if dcase_root else [None]
    results, seen, extra_tags = [], {}, tags or {}
    for (name, path, frozen), channel in [(r, c) for r in resolved for c in channels]:
        origin = {} if frozen else provenance(path)
        seed = origin.get("seed", cfg.train.seed)
        folder = f"{name}-seed{seed}" if origin else name
        folder += f"-ch{channel}" if len(channels) > 1 else ""
        seen[folder] = seen.get(folder, 0) + 1
        folder = folder if seen[folder] == 1 else f"{folder}_{seen[folder]}"
        num_layers = depths[path]
        primary = primary_layer(e, frozen, num_layers, name)
        use_layers = [primary] + [x for x in (layers or []) if x != primary and x <= num_layers]
        embedder = Embedder(path, pooling=e.pooling, cache_dir=cache_dir, batch_size=e.batch_size)
        run_dir = out_dir / folder
        if dcase_root:
            result = evaluate_dcase(embedder, dcase_root, use_layers, ground_truth_dir=ground_truth_dir, k=e.k,
                                    metric=e.metric, clip_s=cfg.data.clip_s, name=folder, channel=channel)
        else:
            result = evaluate_checkpoint(path, sets, use_layers, k=e.k, metric=e.metric,
                                         memmixup=e.memmixup_k if e.memmixup else 0,
                                         memmixup_ratio=e.memmixup_ratio, conditions=e.conditions,
                                         use_ray=use_ray, name=folder, embedder=embedder, primary=e.primary)
        if dcase_root:
            result.scored_on = {"eval.corpus": str(dcase_root), "eval.split": "test",
                                "eval.sizes": f"{len({m for c in result.cells for m in c.machines})} machines"}
        write_score_files(result, run_dir / "scores")
        if dcase_root:
            write_dcase_table(result, run_dir / "dcase_table.md")
        else:
            write_reports([result], run_dir)
        params, tags = _run_params(cfg, origin, frozen), {
            "kind": "evaluate", "preset": name, "seed": str(seed), "frozen": str(frozen).lower(),
            "pretrain_run_id": origin.get("pretrain_run_id", ""), "checkpoint": origin.get("uri") or path,
            "checkpoint_hash": result.checkpoint_hash, "layers": str(use_layers),
            "mode": "dcase" if dcase_root else "evalsets",
            "domains": "source only (AUC + pAUC)" if dcase_root and source_only(result) else "",
            "dcase_layout": result.layout, "channel": result.channel}
        tags = {k: v for k, v in {**tags, **result.scored_on}.items() if v} | dict(extra_tags)
        if track:
            run = run_name("evaluate", name, seed) + (f"-ch{channel}" if len(channels) > 1 else "")
            with mlflow_run(uri, cfg.tracking.experiment, run, params, tags,
                            nested=active_run_id() is not None, storage=cfg.data.storage) as tracked:
                log_metrics(result.metrics())
                log_artifacts(run_dir, artifact_path="evaluate")
                result.run_id = tracked.info.run_id
        results.append(result)
    if not dcase_root and len(results) > 1:
        write_reports(results, out_dir)
    if dcase_root and len(channels) > 1:
        for start in range(0, len(results), len(channels)):  # one checkpoint's channels are adjacent
            mine = results[start:start + len(channels)]
            fsio.write_text(out_dir / f"channels_{resolved[start // len(channels)][0]}.md",
                            "\n".join(channels_side_by_side(mine, dn) for dn in (e.primary == "dn", e.primary != "dn")))
    return results


def primary_layer(e, frozen: bool, num_layers: int, name: str = "") -> int:
    """The layer `evaluate` reports for an encoder: eval.ssl_layer for a frozen SSL baseline (Table 2: 12), else
    eval.layer; clamped (with a warning) to the encoder's depth."""
    primary = e.ssl_layer if frozen else e.layer
    if primary > num_layers:
        warnings.warn(f"{name}: layer {primary} > the encoder's {num_layers} blocks; using {num_layers}",
                      stacklevel=3)
        primary = num_layers
    return primary


def _run_params(cfg, origin: dict, frozen: bool) -> dict:
    """The flattened config keys pre-training logs (same keys in both runs): the scored student's own config
    (config.yaml beside it) with this evaluation's eval / tracking sections; "frozen" says so in objective.name."""
    from retain_asd.config import to_dict

    values = to_dict(cfg)
    if origin:  # + what pre-training logged beside the config (protocol.* overlap counts)
        values = {**origin["config"], "eval": values["eval"], "tracking": values["tracking"],
                  **origin.get("extra_params", {})}
    if frozen:
        values["objective"] = {**values["objective"], "name": "frozen"}
    return values


# ---------------------------------------------------------------------------------------------------- analyses
def _resolved(checkpoints: Sequence[ResolvedCheckpoint]) -> list[ResolvedCheckpoint]:
    for c in checkpoints:
        if not isinstance(c, tuple):
            raise TypeError(f"{c!r}: evaluation takes resolved checkpoints; resolve --checkpoint values with "
                            "retain_asd.experiments.resolve_checkpoints(cfg, specs, out_dir)")
    return [ResolvedCheckpoint(*c) for c in checkpoints]


def _prepare(cfg, checkpoints: Sequence[ResolvedCheckpoint], out_dir: Path):
    """Open every checkpoint, run the leakage guard, build the eval sets: (resolved, depths, sets)."""
    from retain_asd.corpus.ingest import check_protocol
    from retain_asd.eval.evalsets import evalsets_from_config

    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = _resolved(checkpoints)
    depths = check_checkpoints(resolved, 1, None, cfg.model.family)
    check_protocol(cfg)
    return resolved, depths, evalsets_from_config(cfg)


def table3_from_config(cfg, checkpoints: Sequence[ResolvedCheckpoint], out_dir: str | os.PathLike, *,
                       layer: int | None = None, snrs_db: Sequence[float] | None = None, resamples: int = 200,
                       track: bool = True, sets=None):
    """Builder of `retain-asd table3`: the testbed check (Table 3 at every condition x `snrs_db`, default -5 0 5,
    no DN, with paired-bootstrap intervals) of the first checkpoint (e.g. "frozen"), read at `layer` (default
    eval.layer), plus the wave-mixture scores of any others; table3.md, table3.json, table3.png and (`track`)
    one MLflow run. `sets`: evaluation sets already built (the study's). Returns (Table3, written paths)."""
    from retain_asd.config import to_dict
    from retain_asd.eval.analyses import TABLE3_CONDITIONS, TABLE3_SNRS_DB, table3, write_table3
    from retain_asd.tracking import log_artifacts, log_metrics, mlflow_run, resolve_tracking_uri

    out_dir = Path(out_dir)
    if sets is None:
        resolved, _, sets = _prepare(cfg, checkpoints, out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = _resolved(checkpoints)
    e = cfg.eval
    snrs_db = [float(s) for s in (TABLE3_SNRS_DB if snrs_db is None else snrs_db)]
    missing = [s for s in snrs_db if s not in sets.snrs_db]
    if missing:
        raise ValueError(f"Table 3 needs the evaluation sets at {missing} dB: eval.snrs_db = {sets.snrs_db}; add "
                         "them to eval.snrs_db or choose --snrs among those")
    conditions = [c for c in TABLE3_CONDITIONS if c in e.conditions]
    if "mismatch" not in conditions:
        raise ValueError(f"Table 3 needs the Mismatch condition: eval.conditions = {list(e.conditions)}; add "
                         "'mismatch'")
    use = layer or e.layer
    result = table3(sets, [(name, path) for name, path, _ in resolved], use, lam=cfg.objective.lam, k=e.k,
                    metric=e.metric, pooling=e.pooling, batch_size=e.batch_size, conditions=conditions,
                    snrs_db=snrs_db, resamples=resamples, seed=e.seed, cache_dir=embedding_cache_dir(cfg))
    paths = write_table3(result, out_dir)
    if track:
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
        params = {"config": to_dict(cfg), "checkpoints": [p for _, p, _ in resolved], "layer": result.layer,
                  "snrs_db": snrs_db, "resamples": resamples}
        with mlflow_run(uri, cfg.tracking.experiment, "table3", params, {"kind": "table3"},
                        storage=cfg.data.storage):
            log_metrics(result.metrics())
            log_artifacts(out_dir, artifact_path="table3")
    return result, paths


def layers_from_config(cfg, checkpoints: Sequence[ResolvedCheckpoint], out_dir: str | os.PathLike,
                       dcase_root: str | os.PathLike | None = None, ground_truth_dir: str | os.PathLike | None = None):
    """Builder of `retain-asd layers` (Fig. 2): every layer of each encoder from one forward pass per clip,
    scored by the primary Table-2 hmean over all sets; layers.md, score_per_layer.png, one MLflow run per
    encoder with ``layerwise/hmean_all_primary_<dn|raw>`` logged at step = layer (and the raw / DN figures).
    With `dcase_root`: the same on a DCASE tree, scored by the official score (`layers_dcase`)."""
    from retain_asd.eval.analyses import layerwise_markdown
    from retain_asd.eval.report import plot_score_per_layer
    from retain_asd.tracking import log_artifacts, log_metrics, mlflow_run, resolve_tracking_uri

    if dcase_root:
        return layers_dcase(cfg, checkpoints, out_dir, dcase_root, ground_truth_dir)
    out_dir = Path(out_dir)
    resolved, depths, sets = _prepare(cfg, checkpoints, out_dir)
    e = cfg.eval
    primary_dn = e.primary == "dn"
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    scores: dict[str, dict[int, float]] = {}
    for name, path, _ in resolved:
        layers = list(range(1, depths[path] + 1))
        embedder = Embedder(path, pooling=e.pooling, cache_dir=embedding_cache_dir(cfg), batch_size=e.batch_size)
        result = evaluate_checkpoint(path, sets, layers, k=e.k, metric=e.metric, conditions=e.conditions,
                                     name=name, embedder=embedder, primary=e.primary)
        scores[name] = {x: result.table2(x, primary_dn)[-1].hmean_all for x in layers}
        with mlflow_run(uri, cfg.tracking.experiment, f"layers-{name}", {"checkpoint": path, "layers": layers},
                        {"kind": "layers"}, storage=cfg.data.storage):
            for x in layers:
                figures = {f"layerwise/hmean_all_primary_{e.primary}": scores[name][x],
                           "layerwise/hmean_all": result.table2(x, False)[-1].hmean_all,
                           "layerwise/hmean_all_dn": result.table2(x, True)[-1].hmean_all}
                log_metrics({k: v for k, v in figures.items() if v == v}, step=x)
            log_metrics({f"layer_{x}/hmean_all_primary_{e.primary}": v for x, v in scores[name].items() if v == v})
    figure = f"hmean over all sets ({'DN' if primary_dn else 'raw'}, primary)"
    md = fsio.write_text(out_dir / "layers.md", layerwise_markdown(scores, figure))
    png = plot_score_per_layer(scores, out_dir / "score_per_layer.png")
    with mlflow_run(uri, cfg.tracking.experiment, "layers", {"checkpoints": [p for _, p, _ in resolved]},
                    {"kind": "layers"}, storage=cfg.data.storage):
        log_artifacts(out_dir, artifact_path="layers")
    return scores, [md, png]


def layers_dcase(cfg, checkpoints: Sequence[ResolvedCheckpoint], out_dir: str | os.PathLike,
                 dcase_root: str | os.PathLike, ground_truth_dir: str | os.PathLike | None = None):
    """Fig. 2 on a DCASE tree (the paper's DCASE 2023 / 2025 curves): every layer of each encoder from one forward
    pass per clip (`dcase_mode.evaluate_dcase`, channel data.channel), scored per layer by the official score of
    the tree's year (the figure `evaluate --dcase-root` reports with eval.layer = that layer; eval.primary: DN or
    raw). The layer `evaluate --dcase-root` uses (`primary_layer`) is marked. Writes layers.md (encoders x layers,
    then a machine x layer table per encoder), score_per_layer.png, and one MLflow run per encoder
    (``layerwise/dcase_official_<dn|raw>`` at step = layer, ``layer_<k>/dcase/official[_dn]`` and
    ``layer_<k>/dcase/<machine section>/hmean[_dn]``) plus a run ``layers`` with the files."""
    from retain_asd.eval.analyses import layerwise_machine_markdown, layerwise_markdown
    from retain_asd.eval.dcase_mode import evaluate_dcase, machines_by_layer, official_by_layer
    from retain_asd.eval.report import plot_score_per_layer
    from retain_asd.tracking import log_artifacts, log_metrics, mlflow_run, resolve_tracking_uri

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    dn = e.primary == "dn"
    resolved = _resolved(checkpoints)
    depths = check_checkpoints(resolved, 1, None, cfg.model.family)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    scores: dict[str, dict[int, float]] = {}
    per_machine: dict[str, dict[str, dict[int, float]]] = {}
    marked: dict[str, int] = {}
    layout = channel = ""
    for name, path, frozen in resolved:
        layers = list(range(1, depths[path] + 1))
        marked[name] = primary_layer(e, frozen, depths[path], name)
        embedder = Embedder(path, pooling=e.pooling, cache_dir=embedding_cache_dir(cfg), batch_size=e.batch_size)
        result = evaluate_dcase(embedder, dcase_root, layers, ground_truth_dir=ground_truth_dir, k=e.k,
                                metric=e.metric, clip_s=cfg.data.clip_s, name=name, channel=cfg.data.channel)
        layout, channel = result.layout, result.channel
        scores[name] = official_by_layer(result, dn)
        per_machine[name] = machines_by_layer(result, dn)
        tags = {"kind": "layers", "mode": "dcase", "dcase_layout": result.layout, "channel": result.channel,
                "evaluate_layer": str(marked[name])}
        with mlflow_run(uri, cfg.tracking.experiment, f"layers-{name}", {"checkpoint": path, "layers": layers},
                        tags, storage=cfg.data.storage):
            for flag, suffix in ((False, ""), (True, "_dn")):
                for x, value in official_by_layer(result, flag).items():
                    log_metrics({f"layerwise/dcase_official{suffix}": value}, step=x)
                    log_metrics({f"layer_{x}/dcase/official{suffix}": value})
                for machine, by in machines_by_layer(result, flag).items():
                    log_metrics({f"layer_{x}/dcase/{machine}/hmean{suffix}": v for x, v in by.items() if v == v})
            for x, value in scores[name].items():
                log_metrics({f"layerwise/dcase_official_{e.primary}": value}, step=x)
    where = f"{layout}, {channel}"
    figure = f"official score ({'DN' if dn else 'raw'}, primary) on the {where} tree {dcase_root}"
    text = layerwise_markdown(scores, figure, marked) + "".join(
        "\n" + layerwise_machine_markdown(per_machine[name], name, marked[name]) for name in scores)
    md = fsio.write_text(out_dir / "layers.md", text)
    png = plot_score_per_layer(scores, out_dir / "score_per_layer.png", marked=marked, title=where)
    with mlflow_run(uri, cfg.tracking.experiment, "layers", {"checkpoints": [p for _, p, _ in resolved]},
                    {"kind": "layers", "mode": "dcase", "dcase_layout": layout, "channel": channel},
                    storage=cfg.data.storage):
        log_artifacts(out_dir, artifact_path="layers")
    return scores, [md, png]
