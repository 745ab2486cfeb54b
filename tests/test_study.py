"""`retain-asd study`: rows from presets, the interval over seeds, the resume skip, one MLflow run per row x
seed plus a summary run. Real Ray, MLflow and Parquet on the small synthetic corpus (frozen rows: no training)."""

from __future__ import annotations

import json
import math

import pytest

from retain_asd.config import ConfigError, load_config
from retain_asd.study import (
    RESULT,
    CellResult,
    mean_interval,
    parse_rows,
    row_config,
    run_study,
    summarise,
)


def test_mean_interval_is_the_student_t_interval():
    mean, half = mean_interval([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72)
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_interval([0.5]) == (0.5, 0.0) and mean_interval([0.6, 0.6])[1] == 0.0


def test_rows_take_objective_and_mixing_from_their_preset(tmp_path):
    cfg = load_config("synthetic_table2", overrides=[f"data.work_dir={tmp_path}"])
    assert [r.label for r in parse_rows(cfg.study.rows)][:4] == ["frozen", "denoise", "denoise_linear_mixup",
                                                                  "denoise_snr_mixup"]
    assert len(cfg.study.rows) == 10 and cfg.study.seeds == (0, 1, 2)
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


def test_summary_averages_each_seeds_hmeans():
    cells = [CellResult("a", s, {("factory_a", 0): v, ("factory_a", -10): v}, v, v) for s, v in
             enumerate([0.6, 0.7, 0.8])]
    cells.append(CellResult("b", 0, {("factory_a", 0): 0.5}, 0.5, 0.5))
    table = summarise(cells, ["b", "a"])
    assert list(table.rows) == ["b", "a"]
    assert table.columns == ["factory_a/snr_-10", "factory_a/snr_0", "hmean_low", "hmean_all"]
    mean, half, n = table.rows["a"]["hmean_all"]
    assert (round(mean, 6), n) == (70.0, 3) and half == pytest.approx(100 * mean_interval([0.6, 0.7, 0.8])[1])
    assert "70.00 ± " in table.markdown() and table.rows["b"]["hmean_low"] == (50.0, 0.0, 1)


@pytest.fixture(scope="module")
def study_setup(small_corpus, tmp_path_factory):
    from retain_asd.corpus.ingest import load_corpus
    from retain_asd.eval.evalsets import EvalSetParams, build_evalsets

    tmp = tmp_path_factory.mktemp("study")
    sets = build_evalsets(small_corpus / "corpus", tmp / "sets",
                          EvalSetParams(snrs_db=(-10.0, 0.0, 10.0), source_refs=6, target_refs=2, test_normal=4,
                                        test_anomaly=4))
    return tmp, load_corpus(small_corpus / "corpus"), sets


def test_rerun_skips_finished_rows(study_setup, ray_local, tmp_path):
    from retain_asd.tracking import compare_runs

    _, corpus, sets = study_setup
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", overrides=[f"data.work_dir={tmp_path / 'work'}", f"tracking.tracking_uri={uri}",
                                          "tracking.experiment=study-test", "study.rows=[frozen, again:frozen]",
                                          "study.seeds=[0, 1]", "eval.ssl_layer=2", "data.clip_s=2.0"])
    lines: list[str] = []
    first = run_study(cfg, tmp_path / "out", evaluation_sets=sets, corpus=corpus, say=lines.append)
    assert len(first.cells) == 4 and not any(c.skipped for c in first.cells)
    assert first.table.rows["frozen"]["hmean_all"][1] == 0.0  # frozen is deterministic: no spread over seeds
    runs = compare_runs(uri, "study-test", ["hmean_all"])
    assert sorted(r["run_name"] for r in runs) == ["again/seed0", "again/seed1", "frozen/seed0", "frozen/seed1",
                                                   "summary"]
    by_name = {r["run_name"]: r["hmean_all"] for r in runs}
    assert by_name["frozen/seed1"] == pytest.approx(first.cells[2].hmean_all)

    # a finished cell is skipped; a cell without its result.json (interrupted) runs again, once in MLflow
    (tmp_path / "out" / "rows" / "again" / "seed1" / RESULT).unlink()
    lines.clear()
    second = run_study(cfg, tmp_path / "out", evaluation_sets=sets, corpus=corpus, say=lines.append)
    skipped = [c for c in second.cells if c.skipped]
    assert [(c.row, c.seed) for c in skipped] == [("frozen", 0), ("again", 0), ("frozen", 1)]
    assert sum("skipped" in line for line in lines) == 3
    assert [c.hmean_all for c in second.cells] == pytest.approx([c.hmean_all for c in first.cells])
    names = sorted(r["run_name"] for r in compare_runs(uri, "study-test", ["hmean_all"]))
    assert names == sorted(["again/seed0", "again/seed1", "frozen/seed0", "frozen/seed1", "summary"])
    table = (tmp_path / "out" / "summary" / "table2.md").read_text()
    assert table.splitlines()[2].startswith("| frozen | ")
    assert json.loads((tmp_path / "out" / "rows" / "again" / "seed1" / RESULT).read_text())["row"] == "again"
