"""`retain-asd study`: rows from presets, the resume skip, one MLflow point run per row x seed (its pretrain and
evaluate runs nested) plus a summary run, and the table is `retain-asd compare`'s. Real Ray, MLflow and Parquet
on the small synthetic worlds (frozen rows: no training)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from retain_asd.config import ConfigError, load_config
from retain_asd.experiments.study import REPLICATES, RESULT, parse_rows, row_config, run_study


def test_rows_take_objective_and_mixing_from_their_preset(tmp_path):
    cfg = load_config("synthetic_table2", overrides=[f"data.work_dir={tmp_path}"])
    assert [r.label for r in parse_rows(cfg.study.rows)][:4] == ["frozen", "denoise", "denoise_linear_mixup",
                                                                  "denoise_snr_mixup"]
    assert len(cfg.study.rows) == 12 and cfg.study.seeds == (0, 1, 2)
    # the two level rows: denoise and tagging_mixture_pm5 with the training mixtures at the clean clip's level
    for label, base in (("denoise_clean", "denoise"), ("tagging_mixture_pm5_clean", "tagging_mixture_pm5")):
        clean, unit = (row_config(cfg, parse_rows([x])[0], 0) for x in (label, base))
        assert (clean.mixing.level, unit.mixing.level) == ("clean", "unit_noise")
        assert clean.objective == unit.objective and clean.mixing.snr_low_db == unit.mixing.snr_low_db
    (row,) = parse_rows(["tagging_mixture:tagging_0db"])
    rc = row_config(cfg, row, seed=2)
    assert (rc.objective.name, rc.objective.beta, rc.mixing.snr_sampler) == ("tagging", 0.0, "fixed")
    assert (rc.train.seed, rc.mixing.seed) == (2, 2)
    assert rc.objective.align_layer == 4 and rc.eval.layer == 2  # the study's, not the preset's
    frozen = row_config(cfg, parse_rows(["frozen"])[0], 0)
    assert frozen.eval.layer == 2  # frozen.yaml's layer 12 is not taken: layers are the study's
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        parse_rows(["x:nope"])
    with pytest.raises(ConfigError, match="appears twice"):
        parse_rows(["denoise", "denoise"])


def test_rerun_skips_finished_rows(small_worlds, ray_local, tmp_path):
    import csv

    from retain_asd.eval.compare import compare_experiment
    from retain_asd.eval.report import metric_keys, plus_minus
    from retain_asd.tracking import compare_runs, experiment_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", overrides=[*small_worlds, f"data.work_dir={tmp_path / 'work'}",
                                          f"tracking.tracking_uri={uri}", "tracking.experiment=study-test",
                                          "study.rows=[frozen, denoise:frozen]", "study.seeds=[0, 1]",
                                          "eval.ssl_layer=2", "data.clip_s=2.0", "eval.snrs_db=[-5.0, 5.0]",
                                          "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2",
                                          "eval.test_anomaly=2"])
    lines: list[str] = []
    first = run_study(cfg, tmp_path / "out", say=lines.append, resamples=20)
    assert len(first.cells) == 4 and not any(c.skipped for c in first.cells)
    assert [(c.row, c.seed) for c in first.cells] == [("frozen", 0), ("denoise", 0), ("frozen", 1), ("denoise", 1)]
    runs = compare_runs(uri, "study-test", ["hmean_all_dn"])
    points = ["denoise-seed0", "denoise-seed1", "frozen-seed0", "frozen-seed1"]
    expected = sorted(["summary", *(f"{kind}-{p}" for p in points for kind in ("point", "pretrain", "evaluate"))])
    assert sorted(r["run_name"] for r in runs) == expected
    by_name = {r["run_name"]: r["hmean_all_dn"] for r in runs}
    assert by_name["evaluate-frozen-seed1"] == pytest.approx(first.cells[2].hmean_all)  # eval.primary: DN
    rows = {r.name: r for r in first.comparison.rows}
    assert set(rows) == {"frozen", "denoise"} and rows["frozen"].seeds == ("0", "1")
    assert rows["frozen"].estimates["hmean_all_dn"].n == 2  # (smoke: a random encoder per seed, so a spread)
    assert first.table.splitlines()[1].startswith("frozen ")  # Table-2 order, not ranked
    # `retain-asd compare` on the same experiment: the same cells; the headline figures' means are the same (the
    # per-clip score files give back the logged figures), their intervals count the test clips too: wider
    again = compare_experiment("study-test", tracking_uri=uri, out_dir=tmp_path / "cmp", metric="hmean_low_dn",
                               log_run=False)
    for theirs in again.rows:
        ours = rows[theirs.name]
        for key in metric_keys(again.columns, "raw")[:-2] + metric_keys(again.columns, "dn")[:-2]:
            assert ours.estimates[key] == theirs.estimates[key]
        for key in ("hmean_all", "hmean_all_dn"):
            interval = first.headline.intervals[theirs.name][key]
            assert ours.estimates[key].mean == interval.mean == pytest.approx(theirs.estimates[key].mean, abs=1e-12)
            assert ours.estimates[key].half_width == interval.half_width > theirs.estimates[key].half_width
            assert interval.clip_half > 0
    # the header says what the intervals count; the table, the CSV and MLflow carry them
    assert first.headline.header().startswith("95% interval over 2 training seeds (t) and 20 bootstrap draws of the "
                                              "test clips")
    markdown = (tmp_path / "out" / "summary" / "comparison.md").read_text()
    assert markdown == first.comparison.markdown and first.headline.header() in markdown
    assert f"intervals: {first.headline.header()}" in " ".join(lines)
    frozen = first.headline.intervals["frozen"]["hmean_all_dn"]
    assert plus_minus(rows["frozen"].estimates["hmean_all_dn"]) in first.table.splitlines()[1]
    csv_rows = {r["run"]: r for r in csv.DictReader((tmp_path / "out" / "summary" / "comparison.csv").open())}
    assert float(csv_rows["frozen"]["hmean_all_dn_ci95"]) == frozen.half_width
    # denoise here is the frozen encoder again (same seeds, same clips): paired, the difference is exactly 0
    same = first.headline.differences["frozen"]["hmean_all_dn"]
    assert (same.mean, same.half_width, same.call) == (0.0, 0.0, "no difference")
    assert csv_rows["frozen"]["hmean_all_dn_vs_denoise_call"] == "no difference"
    (summary,) = experiment_runs(uri, "study-test", "tags.kind = 'study_summary'")
    assert summary["metrics"]["frozen/hmean_all_dn_ci95"] == pytest.approx(frozen.half_width)
    assert summary["metrics"]["frozen/hmean_all_dn_vs_denoise"] == 0.0
    assert summary["metrics"]["frozen/hmean_all_dn_vs_denoise_ci95"] == 0.0
    assert summary["params"]["intervals.clip_resamples"] == "20"

    # a finished cell is skipped; a cell without its result.json (interrupted) runs again, once in MLflow
    (tmp_path / "out" / "rows" / "denoise" / "seed1" / RESULT).unlink()
    kept = {(c.row, c.seed): (tmp_path / "out" / "rows" / c.row / f"seed{c.seed}" / REPLICATES).stat().st_mtime_ns
            for c in first.cells}
    lines.clear()
    second = run_study(cfg, tmp_path / "out", say=lines.append, resamples=20)
    skipped = [c for c in second.cells if c.skipped]
    assert [(c.row, c.seed) for c in skipped] == [("frozen", 0), ("denoise", 0), ("frozen", 1)]
    assert sum("skipped" in line for line in lines) == 3
    assert [line for line in lines if line.startswith("testbed:")] == [
        "testbed: not run (model.init = random: no initial encoder to check)"]  # said before any row
    assert [c.hmean_all for c in second.cells] == pytest.approx([c.hmean_all for c in first.cells])
    names = sorted(r["run_name"] for r in compare_runs(uri, "study-test", ["hmean_all"]))
    assert names == expected  # the interrupted point's run continued, its evaluation replaced
    assert second.table == first.table  # the same draws over the same score files
    again_kept = {k: (tmp_path / "out" / "rows" / k[0] / f"seed{k[1]}" / REPLICATES).stat().st_mtime_ns for k in kept}
    assert [k for k in kept if again_kept[k] != kept[k]] == [("denoise", 1)]  # the skipped cells' replicates kept
    assert json.loads((tmp_path / "out" / "rows" / "denoise" / "seed1" / RESULT).read_text())["row"] == "denoise"

    # study.base: the same finished cells against another row, nothing run again; the summary run is replaced
    third = run_study(dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, base="frozen")), tmp_path / "out",
                      say=lines.append, resamples=20)
    assert all(c.skipped for c in third.cells) and third.headline.base == "frozen"
    assert "vs frozen" in third.table.splitlines()[0] and "(base)" in third.table.splitlines()[1]
    (summary,) = experiment_runs(uri, "study-test", "tags.kind = 'study_summary'")
    assert summary["metrics"]["denoise/hmean_all_dn_vs_frozen"] == 0.0  # denoise:frozen, the same encoder
    assert not any(k.endswith("_vs_denoise") for k in summary["metrics"])
    assert summary["params"]["intervals.base_row"] == "frozen"


# ---------------------------------------------------------------------------------------------------- intervals
# The study table's headline intervals (pure numpy): per-clip scores of one machine at one set, 3 seeds per row.
PER_GROUP, SEEDS, DRAWS = 40, (0, 1, 2), 40
CELL = ("mismatch", -5.0, "m")


def _labels():
    from retain_asd.eval.uncertainty import Labels

    return {"m": Labels(np.repeat([False, True, False, True], PER_GROUP), np.repeat([False, False, True, True],
                                                                                    PER_GROUP))}


def _row(separation: float, clip_errors: np.ndarray, rng) -> dict:
    """One row at each seed: anomalies `separation` above the normals, plus the row's own clip errors (the same at
    every seed, as an encoder's are) and a little seed jitter; its DN scores are the same shifted by 1."""
    is_anomaly = _labels()["m"].is_anomaly
    out = {}
    for seed in SEEDS:
        raw = separation * is_anomaly + clip_errors + 0.05 * rng.standard_normal(is_anomaly.size)
        out[seed] = {"raw": {CELL: raw}, "dn": {CELL: raw + 1.0}}
    return out


@pytest.fixture(scope="module")
def planted():
    """denoise, a row with a planted difference well inside the test clips' noise (+0.05 separation, about one AUC
    point, while two rows that err on different clips differ by several points from the clips alone), one far above
    it (+1.5) and one far below (-0.7)."""
    from retain_asd.eval.uncertainty import auc_steps, clip_draws
    from retain_asd.experiments.study import cell_figures, headline_intervals

    rng = np.random.default_rng(4)
    errors = rng.standard_normal((4, 4 * PER_GROUP))
    scores = {"denoise": _row(1.0, errors[0], rng), "small": _row(1.05, errors[1], rng),
              "large": _row(2.5, errors[2], rng), "below": _row(0.3, errors[3], rng)}
    draws = clip_draws(_labels(), DRAWS, seed=7)  # as the study draws them (eval.seed = 7)
    figures = {row: {s: cell_figures(by_seed[s], _labels(), draws) for s in SEEDS} for row, by_seed in scores.items()}
    return scores, headline_intervals(figures, DRAWS, auc_steps(_labels())), figures


def _comparison(scores):
    """What `compare_experiment` gives for these rows: the figures' mean and t-interval over seeds only."""
    from retain_asd.eval.compare import Comparison
    from retain_asd.eval.report import ComparisonRow, mean_interval
    from retain_asd.eval.uncertainty import figure_replicates, whole_set

    rows = []
    for name, by_seed in scores.items():
        estimates = {}
        for variant, suffix in (("raw", ""), ("dn", "_dn")):
            points = [figure_replicates(by_seed[s][variant], _labels(), whole_set(_labels())) for s in SEEDS]
            estimates[f"hmean_all{suffix}"] = mean_interval([p["hmean_all"][0] for p in points])
        rows.append(ComparisonRow(name, tuple(map(str, SEEDS)), 3, 0, estimates))
    return Comparison("## exp: Table 2 (12 runs, ranked by hmean_all_dn)\n", rows, [("mismatch", -5)], "dn")


def test_the_study_interval_is_combined_interval_of_the_same_inputs(planted):
    from retain_asd.eval.report import plus_minus
    from retain_asd.eval.uncertainty import clip_draws, combined_interval, figure_replicates, whole_set
    from retain_asd.experiments.study import compact_table, with_headline

    scores, headline, _ = planted
    draws = clip_draws(_labels(), DRAWS, seed=7)
    for row, variant, key in (("small", "raw", "hmean_all"), ("small", "dn", "hmean_all_dn"),
                              ("denoise", "dn", "hmean_all_dn")):
        points = [figure_replicates(scores[row][s][variant], _labels(), whole_set(_labels()))["hmean_all"][0]
                  for s in SEEDS]
        reps = np.stack([figure_replicates(scores[row][s][variant], _labels(), draws)["hmean_all"] for s in SEEDS])
        expected = combined_interval(points, reps)
        assert headline.intervals[row][key] == expected
        assert expected.clip_half > 0 and expected.seed_half > 0  # both sources counted
    assert "hmean_low" not in headline.intervals["small"]  # one SNR: no hmean{-10,-5,0}, as metrics.table2

    comparison = _comparison(scores)
    seeds_only = {r.name: r.estimates["hmean_all_dn"] for r in comparison.rows}
    table = with_headline(comparison, headline)
    for row in table.rows:  # the table shows the combined interval, wider than the seeds-only one
        e, i = row.estimates["hmean_all_dn"], headline.intervals[row.name]["hmean_all_dn"]
        assert (e.mean, e.half_width) == (i.mean, i.half_width)
        assert e.mean == pytest.approx(seeds_only[row.name].mean, abs=1e-12)
        assert e.half_width > 2 * seeds_only[row.name].half_width
        assert plus_minus(e) in next(line for line in table.markdown.splitlines() if line.startswith(f"| {row.name} "))
    console = compact_table(table, ["denoise", "small", "large", "below"], headline)
    assert plus_minus(table.rows[1].estimates["hmean_all_dn"]) in console.splitlines()[2]


def test_a_difference_inside_the_clip_noise_is_not_called_a_large_one_is(planted, tmp_path):
    import csv

    from retain_asd.eval.report import write_comparison_csv
    from retain_asd.eval.uncertainty import combined_interval, figure_replicates, whole_set
    from retain_asd.experiments.study import compact_table, difference_columns, with_headline

    scores, headline, _ = planted
    assert headline.base == "denoise" and set(headline.differences) == {"small", "large", "below"}
    small = headline.differences["small"]["hmean_all_dn"]
    assert not small.excludes_zero and small.call == "no difference"
    assert 0 < abs(small.mean) < small.half_width and small.clip_half > 3 * small.seed_half
    points = {row: [figure_replicates(scores[row][s]["dn"], _labels(), whole_set(_labels()))["hmean_all"][0]
                    for s in SEEDS] for row in ("small", "denoise")}
    seeds_only = combined_interval(np.subtract(points["small"], points["denoise"]), np.zeros((3, 1)))
    assert seeds_only.mean == pytest.approx(small.mean, abs=1e-12)
    assert seeds_only.excludes_zero  # an interval over seeds alone would have called it
    assert headline.differences["large"]["hmean_all_dn"].call == "better"
    assert headline.differences["large"]["hmean_all_dn"].mean > 0.1
    assert headline.differences["below"]["hmean_all_dn"].call == "worse"

    table = with_headline(_comparison(scores), headline)
    first = table.markdown.split("\n### ")[1]  # the headline table (the per-variant tables follow)
    lines = {line.split(" | ")[0][2:]: line for line in first.splitlines() if line.startswith("| ")}
    assert lines["small"].count("no difference") == 2 and "(base)" in lines["denoise"]  # raw and DN All
    assert "better" in lines["large"] and "worse" in lines["below"]
    console = {line.split()[0]: line for line in compact_table(table, None, headline).splitlines()[1:]}
    assert "no difference" in console["small"] and "better" in console["large"] and "worse" in console["below"]

    path = write_comparison_csv(table.rows, table.columns, tmp_path / "comparison.csv",
                                extra=difference_columns(headline))
    rows = {r["run"]: r for r in csv.DictReader(path.open())}
    assert rows["small"]["hmean_all_dn_vs_denoise_call"] == "no difference"
    assert float(rows["small"]["hmean_all_dn_vs_denoise"]) == small.mean
    assert float(rows["small"]["hmean_all_dn_vs_denoise_ci95"]) == small.half_width
    assert float(rows["small"]["hmean_all_dn_ci95"]) == headline.intervals["small"]["hmean_all_dn"].half_width
    assert rows["denoise"]["hmean_all_dn_vs_denoise"] == "" and rows["large"]["hmean_all_vs_denoise_call"] == "better"


def test_the_header_states_seeds_draws_and_resolution(planted):
    from retain_asd.eval.uncertainty import auc_steps
    from retain_asd.experiments.study import headline_intervals, with_headline

    scores, headline, figures = planted
    assert headline.header().startswith("95% interval over 3 training seeds (t) and 40 bootstrap draws of the test "
                                        "clips")
    markdown = with_headline(_comparison(scores), headline).markdown
    assert markdown.startswith("## exp: Table 2")
    assert "mean ± 95% interval over 3 training seeds (t) and 40 bootstrap draws of the test clips" in markdown
    # one AUC step: 40 source normals x 80 anomalies = 3200 pairs = 0.0312 points; then the differences' half widths
    halves = sorted(100 * d["hmean_all_dn"].half_width for d in headline.differences.values())
    assert ("Resolution: one AUC step (1 / normal x anomalous clips per domain) is 0.0312 points here; the "
            f"differences against denoise (dn All) have 95% half widths of {halves[0]:.2f}-{halves[-1]:.2f} points"
            ) in markdown
    assert "over seeds only" in markdown  # the condition x SNR cells say that theirs count seeds only
    alone = headline_intervals({"small": figures["small"]}, DRAWS, auc_steps(_labels()))
    assert alone.base is None and not alone.differences
    assert alone.resolution("hmean_all_dn").endswith("no denoise row: no difference is called")
    # another base row (study.base): every other row against it, paired the same way
    other = headline_intervals(figures, DRAWS, auc_steps(_labels()), base="small")
    assert other.base == "small" and "small" not in other.differences
    d, e = other.differences["denoise"]["hmean_all_dn"], headline.differences["small"]["hmean_all_dn"]
    assert d.mean == pytest.approx(-e.mean, abs=1e-12) and d.half_width == pytest.approx(e.half_width, abs=1e-12)
    assert headline_intervals(figures, DRAWS, auc_steps(_labels()), base="frozen").resolution(
        "hmean_all_dn").endswith("no frozen row: no difference is called")
    assert headline_intervals(figures, DRAWS, auc_steps(_labels()), base="").resolution(
        "hmean_all_dn").endswith("no base row (study.base is empty): no difference is called")
