"""`retain-asd study`: rows from presets, the resume skip, one MLflow point run per row x seed (its pretrain and
evaluate runs nested) plus a summary run, and the table is `retain-asd compare`'s. Real Ray, MLflow and Parquet
on the small synthetic worlds (frozen rows: no training)."""

from __future__ import annotations

import json

import pytest

from retain_asd.config import ConfigError, load_config
from retain_asd.experiments.study import RESULT, parse_rows, row_config, run_study


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
    from retain_asd.eval.compare import compare_experiment
    from retain_asd.tracking import compare_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", overrides=[*small_worlds, f"data.work_dir={tmp_path / 'work'}",
                                          f"tracking.tracking_uri={uri}", "tracking.experiment=study-test",
                                          "study.rows=[frozen, again:frozen]", "study.seeds=[0, 1]",
                                          "eval.ssl_layer=2", "data.clip_s=2.0", "eval.snrs_db=[-5.0, 5.0]",
                                          "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2",
                                          "eval.test_anomaly=2"])
    lines: list[str] = []
    first = run_study(cfg, tmp_path / "out", say=lines.append)
    assert len(first.cells) == 4 and not any(c.skipped for c in first.cells)
    assert [(c.row, c.seed) for c in first.cells] == [("frozen", 0), ("again", 0), ("frozen", 1), ("again", 1)]
    runs = compare_runs(uri, "study-test", ["hmean_all_dn"])
    points = ["again-seed0", "again-seed1", "frozen-seed0", "frozen-seed1"]
    expected = sorted(["summary", *(f"{kind}-{p}" for p in points for kind in ("point", "pretrain", "evaluate"))])
    assert sorted(r["run_name"] for r in runs) == expected
    by_name = {r["run_name"]: r["hmean_all_dn"] for r in runs}
    assert by_name["evaluate-frozen-seed1"] == pytest.approx(first.cells[2].hmean_all)  # eval.primary: DN
    rows = {r.name: r for r in first.comparison.rows}
    assert set(rows) == {"frozen", "again"} and rows["frozen"].seeds == ("0", "1")
    assert rows["frozen"].estimates["hmean_all_dn"].n == 2  # (smoke: a random encoder per seed, so a spread)
    assert first.table.splitlines()[1].startswith("frozen ")  # Table-2 order, not ranked
    # `retain-asd compare` on the same experiment: the same numbers
    again = compare_experiment("study-test", tracking_uri=uri, out_dir=tmp_path / "cmp", metric="hmean_low_dn",
                               log_run=False)
    assert again.markdown.split("\n", 1)[1] == first.comparison.markdown.split("\n", 1)[1]

    # a finished cell is skipped; a cell without its result.json (interrupted) runs again, once in MLflow
    (tmp_path / "out" / "rows" / "again" / "seed1" / RESULT).unlink()
    lines.clear()
    second = run_study(cfg, tmp_path / "out", say=lines.append)
    skipped = [c for c in second.cells if c.skipped]
    assert [(c.row, c.seed) for c in skipped] == [("frozen", 0), ("again", 0), ("frozen", 1)]
    assert sum("skipped" in line for line in lines) == 3
    assert [line for line in lines if line.startswith("testbed:")] == [
        "testbed: not run (model.init = random: no initial encoder to check)"]  # said before any row
    assert [c.hmean_all for c in second.cells] == pytest.approx([c.hmean_all for c in first.cells])
    names = sorted(r["run_name"] for r in compare_runs(uri, "study-test", ["hmean_all"]))
    assert names == expected  # the interrupted point's run continued, its evaluation replaced
    assert second.table == first.table
    assert json.loads((tmp_path / "out" / "rows" / "again" / "seed1" / RESULT).read_text())["row"] == "again"
