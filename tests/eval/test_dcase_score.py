"""Evaluator-format files and `retain-asd dcase-score` on the real DCASE 2021/2022 ground truth."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.dcase_score import main
from retain_asd.eval.dcase_files import (
    read_decision_file,
    read_ground_truth,
    read_score_file,
    write_anomaly_scores,
    write_decisions,
)
from retain_asd.eval.metrics import machine_scores, official_score

REPO = Path(__file__).resolve().parents[2]
CSV_DIR = REPO.parent / "shared" / "data" / "csv"
GT_2022 = CSV_DIR / "dcase2022_eval_ground_truth"
GT_2021 = CSV_DIR / "dcase2021_eval_ground_truth"
needs_data = pytest.mark.skipif(not CSV_DIR.is_dir(),
                                reason=f"real DCASE ground truth not found at {CSV_DIR}")


def read_csv(path):
    with open(path, newline="") as f:
        return [row for row in csv.reader(f) if row]


def truth_2022():
    """{(machine, 'NN'): (names, is_anomaly, is_target, {anon: full})} read with plain csv."""
    out = {}
    for path in sorted((GT_2022 / "ground_truth_data").glob("*.csv")):
        machine, section = path.stem.removeprefix("ground_truth_").removesuffix("_test").split("_section_")
        labels = dict(read_csv(path))
        domains = dict(read_csv(GT_2022 / "ground_truth_domain" / path.name))
        attributes = GT_2022 / "ground_truth_attributes" / machine / f"attributes_{section}.csv"
        full = {Path(r[0]).name: Path(r[-1]).name for r in read_csv(attributes)[1:]}
        names = sorted(labels)
        out[(machine, section)] = (names, np.array([int(labels[n]) for n in names]),
                                   np.array([int(domains[n]) for n in names]), full)
    return out


def truth_2021():
    out = {}
    for path in sorted((GT_2021 / "ground_truth_data").glob("*.csv")):
        stem = path.stem.removeprefix("ground_truth_").removesuffix("_test")
        machine, rest = stem.split("_section_")
        section, domain = rest.split("_")
        names, labels, domains = out.setdefault((machine, section), ([], [], []))
        for name, label in read_csv(path):
            names.append(name)
            labels.append(int(label))
            domains.append(int(domain == "target"))
    return {k: (n, np.array(a), np.array(d), {}) for k, (n, a, d) in out.items()}


def made_up_scores(truth, seed):
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=len(names)) + 0.7 * is_anomaly + 0.2 * is_target
            for key, (names, is_anomaly, is_target, _) in sorted(truth.items())}


def expected_json(truth, scores):
    sections, per = [], []
    for key, (_names, is_anomaly, is_target, _) in sorted(truth.items()):
        s = machine_scores(scores[key], is_anomaly, is_target)
        per.append(s)
        sections.append({"machine": key[0], "section": key[1], "auc_source": s.auc_source,
                         "auc_target": s.auc_target, "pauc": s.pauc})
    return {"official_score": official_score(per), "sections": sections}


def run_json(capsys, scores_dir, gt_dir):
    assert main(["--scores", str(scores_dir), "--ground-truth", str(gt_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    return json.loads(out)


def write_scores(folder, truth, scores, name_of=lambda key, name: name, shuffle_seed=None):
    rng = np.random.default_rng(shuffle_seed)
    for key, (names, *_rest) in truth.items():
        order = rng.permutation(len(names)) if shuffle_seed is not None else np.arange(len(names))
        renamed = [name_of(key, names[i]) for i in order]
        write_anomaly_scores(folder, key[0], key[1], renamed, scores[key][order])


def test_writers_format_and_readback(tmp_path):
    path = write_anomaly_scores(tmp_path, "fan", 3, ["a.wav", "b.wav"], [0.5, -1.25])
    assert path.name == "anomaly_score_fan_section_03_test.csv"
    assert path.read_text() == "a.wav,0.5\nb.wav,-1.25\n"
    dec = write_decisions(tmp_path, "fan", "section_03", ["a.wav", "b.wav"], np.array([0, 1]))
    assert dec.name == "decision_result_fan_section_03_test.csv"
    assert dec.read_text() == "a.wav,0\nb.wav,1\n"
    assert read_score_file(path) == {"a.wav": 0.5, "b.wav": -1.25}
    assert read_decision_file(dec) == {"a.wav": 0, "b.wav": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, dec.name])  # no temp files left
    with pytest.raises(ValueError, match="duplicate"):
        write_anomaly_scores(tmp_path, "fan", 3, ["a.wav", "a.wav"], [1, 2])
    with pytest.raises(ValueError, match="0 or 1"):
        write_decisions(tmp_path, "fan", 3, ["a.wav"], [2])


@needs_data
def test_real_2022_ground_truth_layout():
    truths = read_ground_truth(GT_2022)
    assert len(truths) == 21 and {t.machine for t in truths} == {
        "ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve"}
    t = truths[0]
    assert (t.machine, t.section, len(t.wav_names)) == ("ToyCar", "03", 200)
    assert len(t.aliases) == 200  # attributes map every full name
    # The ragged valve/attributes_05.csv (rows of 6 and 4 columns) still maps all 200 clips.
    valve05 = next(t for t in truths if (t.machine, t.section) == ("valve", "05"))
    assert sorted(valve05.aliases.values()) == list(valve05.wav_names)


@needs_data
def test_dcase_score_2022_equals_the_definitions(tmp_path, capsys):
    truth = truth_2022()
    scores = made_up_scores(truth, seed=0)
    write_scores(tmp_path / "anon", truth, scores)
    got = run_json(capsys, tmp_path / "anon", GT_2022)
    want = expected_json(truth, scores)
    assert [(s["machine"], s["section"]) for s in got["sections"]] == [
        (s["machine"], s["section"]) for s in want["sections"]]
    for g, w in zip(got["sections"], want["sections"]):
        assert g == {k: (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v) for k, v in w.items()}
    assert got["official_score"] == pytest.approx(want["official_score"], abs=1e-12)
    assert set(got) == {"official_score", "sections"}

    # Full names through ground_truth_attributes, rows shuffled: identical figures.
    write_scores(tmp_path / "full", truth, scores, name_of=lambda key, name: truth[key][3][name],
                 shuffle_seed=1)
    assert run_json(capsys, tmp_path / "full", GT_2022) == got


@needs_data
def test_dcase_score_2021_equals_the_definitions(tmp_path, capsys):
    truth = truth_2021()
    scores = made_up_scores(truth, seed=2)
    write_scores(tmp_path / "single", truth, scores, shuffle_seed=3)
    got = run_json(capsys, tmp_path / "single", GT_2021)
    want = expected_json(truth, scores)
    assert len(got["sections"]) == 21
    for g, w in zip(got["sections"], want["sections"]):
        assert g == {k: (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v) for k, v in w.items()}
    assert got["official_score"] == pytest.approx(want["official_score"], abs=1e-12)

    # The 2021 submission layout: one file per domain.
    pair_dir = tmp_path / "pairs"
    pair_dir.mkdir()
    for (machine, section), (names, _, is_target, _) in truth.items():
        for domain, flag in (("source", 0), ("target", 1)):
            rows = [f"{n},{float(s)!r}\n"
                    for n, s, d in zip(names, scores[(machine, section)], is_target) if d == flag]
            path = pair_dir / f"anomaly_score_{machine}_section_{section}_{domain}_test.csv"
            path.write_text("".join(rows[::-1]))
    assert run_json(capsys, pair_dir, GT_2021) == got


@needs_data
def test_module_entry_point_prints_the_same_json(tmp_path, capsys):
    truth = truth_2022()
    scores = made_up_scores(truth, seed=4)
    write_scores(tmp_path, truth, scores)
    in_process = run_json(capsys, tmp_path, GT_2022)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.dcase_score", "--scores", str(tmp_path),
                           "--ground-truth", str(GT_2022), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == in_process
    table = subprocess.run([sys.executable, "-m", "pipelines.dcase_score", "--scores", str(tmp_path),
                            "--ground-truth", str(GT_2022)],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert table.returncode == 0
    assert f"{in_process['official_score']:.4f}" in table.stdout.splitlines()[-1]


def make_unbalanced_gt(root: Path, rng):
    """A 2022/2023-layout folder with one machine: 67/40 source, 60/33 target normal/anomaly."""
    is_target = np.r_[np.zeros(107), np.ones(93)].astype(int)
    is_anomaly = np.r_[np.zeros(67), np.ones(40), np.zeros(60), np.ones(33)].astype(int)
    perm = rng.permutation(200)
    is_target, is_anomaly = is_target[perm], is_anomaly[perm]
    names = [f"section_00_{i:04d}.wav" for i in range(200)]
    full = [f"section_00_{'target' if d else 'source'}_test_{'anomaly' if a else 'normal'}_{i:04d}_x_1"
            for i, (d, a) in enumerate(zip(is_target, is_anomaly))]
    for sub, values in (("ground_truth_data", is_anomaly), ("ground_truth_domain", is_target)):
        (root / sub).mkdir(parents=True)
        (root / sub / "ground_truth_gadget_section_00_test.csv").write_text(
            "".join(f"{n},{v}\n" for n, v in zip(names, values)))
    (root / "ground_truth_attributes").mkdir()  # 2023 layout: anonymised, full name without .wav
    (root / "ground_truth_attributes" / "ground_truth_gadget_section_00_test.csv").write_text(
        "".join(f"{n},{f}\n" for n, f in zip(names, full)))
    return names, [f + ".wav" for f in full], is_anomaly, is_target


def test_unbalanced_machine_and_clear_errors(tmp_path, capsys):
    rng = np.random.default_rng(9)
    names, full, is_anomaly, is_target = make_unbalanced_gt(tmp_path / "gt", rng)
    scores = rng.normal(size=200) + is_anomaly
    write_anomaly_scores(tmp_path / "s", "gadget", 0, full[::-1], scores[::-1])
    got = run_json(capsys, tmp_path / "s", tmp_path / "gt")
    want = machine_scores(scores, is_anomaly, is_target)
    assert got["sections"] == [{"machine": "gadget", "section": "00",
                                "auc_source": pytest.approx(want.auc_source),
                                "auc_target": pytest.approx(want.auc_target),
                                "pauc": pytest.approx(want.pauc)}]
    assert got["official_score"] == pytest.approx(want.hmean)

    def error_of(score_names, score_values):
        write_anomaly_scores(tmp_path / "bad", "gadget", 0, score_names, score_values)
        assert main(["--scores", str(tmp_path / "bad"), "--ground-truth", str(tmp_path / "gt")]) == 2
        return capsys.readouterr().err

    assert "section_00_0199.wav" in error_of(names[:-1], scores[:-1])  # a missing clip is named
    assert "stray.wav" in error_of(names + ["stray.wav"], np.r_[scores, 0.0])  # an extra one too
    assert "two rows name" in error_of(names[:-1] + [full[0]], scores)  # anonymised and full name of one clip
    (tmp_path / "bad" / "anomaly_score_gadget_section_00_test.csv").write_text("file,score\n")
    assert main(["--scores", str(tmp_path / "bad"), "--ground-truth", str(tmp_path / "gt")]) == 2
    assert "header" in capsys.readouterr().err
    assert main(["--scores", str(tmp_path / "empty"), "--ground-truth", str(tmp_path / "gt")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--scores", str(tmp_path / "empty"), "--ground-truth", str(tmp_path / "gt")]) == 2
    assert "anomaly_score_gadget_section_00_test.csv" in capsys.readouterr().err


@needs_data
def test_dcase_score_out_writes_the_evaluator_result_layout_with_decisions(tmp_path, capsys):
    """`--out DIR`: DIR/result.csv in the evaluator's layout; precision / recall / F1 from the decision files."""
    truth = truth_2022()
    scores = made_up_scores(truth, seed=2)
    write_scores(tmp_path / "sub", truth, scores)
    decided = {}
    for key, (names, *_rest) in truth.items():
        decided[key] = (scores[key] > 0.5).astype(int)
        write_decisions(tmp_path / "sub", key[0], key[1], names, decided[key])
    assert main(["--scores", str(tmp_path / "sub"), "--ground-truth", str(GT_2022), "--out",
                 str(tmp_path / "res")]) == 0
    assert "evaluator result layout" in capsys.readouterr().out
    rows = read_csv(tmp_path / "res" / "result.csv")
    key = sorted(truth)[0]
    names, is_anomaly, is_target, _ = truth[key]
    start = rows.index([key[0]])
    assert rows[start + 1] == ["section", "AUC (all)", "AUC (source)", "AUC (target)", "pAUC", "precision (source)",
                               "precision (target)", "recall (source)", "recall (target)", "F1 score (source)",
                               "F1 score (target)"]
    row = dict(zip(rows[start + 1], rows[start + 2]))
    fig = machine_scores(scores[key], is_anomaly, is_target)
    assert row["section"] == key[1] and float(row["AUC (source)"]) == pytest.approx(fig.auc_source, abs=1e-12)
    src = is_target == 0
    d, a = decided[key][src].astype(bool), is_anomaly[src].astype(bool)
    tp, fp, fn = np.sum(d & a), np.sum(d & ~a), np.sum(~d & a)
    assert float(row["precision (source)"]) == pytest.approx(tp / (tp + fp), abs=1e-12)
    assert float(row["recall (source)"]) == pytest.approx(tp / (tp + fn), abs=1e-12)
    official = next(r for r in rows if r[0] == "official score")
    assert float(official[1]) == pytest.approx(expected_json(truth, scores)["official_score"], abs=1e-12)
    # Without decision files the decision columns stay empty (never made up).
    write_scores(tmp_path / "bare", truth, scores)
    assert main(["--scores", str(tmp_path / "bare"), "--ground-truth", str(GT_2022), "--out",
                 str(tmp_path / "res2")]) == 0
    bare = read_csv(tmp_path / "res2" / "result.csv")
    assert dict(zip(bare[start + 1], bare[start + 2]))["precision (source)"] == ""


def evaluator_formula(truth, scores) -> float:
    """The official score as the DCASE 2023-2025 evaluators compute it, written here from their definition and
    independent of metrics.py: per machine section, AUC over (that domain's normals + every anomaly) for source
    and target, pAUC = roc_auc_score(max_fpr=0.1) over all clips; scipy's hmean over the list of all of them,
    each floored at float epsilon."""
    import scipy.stats
    from sklearn.metrics import roc_auc_score

    auc_s, auc_t, paucs = [], [], []
    for key, (_names, is_anomaly, is_target, _) in sorted(truth.items()):
        y, d, s = np.asarray(is_anomaly), np.asarray(is_target), scores[key]
        src, tgt = (d == 0) | (y == 1), (d == 1) | (y == 1)
        auc_s.append(roc_auc_score(y[src], s[src]))
        auc_t.append(roc_auc_score(y[tgt], s[tgt]))
        paucs.append(roc_auc_score(y, s, max_fpr=0.1))
    return float(scipy.stats.hmean(np.maximum(auc_s + auc_t + paucs, sys.float_info.epsilon)))


MACHINES_2026_EVAL = ("BlowerDustCollector", "Sander", "SewingMachine", "ToothBrush", "ToyDrone")


def make_2026_gt(root: Path, rng):
    """A 2023+-layout ground-truth folder for the five DCASE 2026 evaluation machines: 200 clips each, anonymised
    `section_00_NNNN.wav`, unequal domain / label counts, full names in the 2026 (2023-style) convention."""
    truth = {}
    for sub in ("ground_truth_data", "ground_truth_domain", "ground_truth_attributes"):
        (root / sub).mkdir(parents=True)
    for m, machine in enumerate(MACHINES_2026_EVAL):
        n_target, n_anomaly = 90 + 3 * m, 80 + 5 * m
        is_target = rng.permutation(np.r_[np.zeros(200 - n_target), np.ones(n_target)].astype(int))
        is_anomaly = rng.permutation(np.r_[np.zeros(200 - n_anomaly), np.ones(n_anomaly)].astype(int))
        names = [f"section_00_{i:04d}.wav" for i in range(200)]
        attr = "noAttribute" if machine in ("SewingMachine", "ToothBrush") else "spd_31V"
        full = [f"section_00_{'target' if d else 'source'}_test_{'anomaly' if a else 'normal'}_{i:04d}_{attr}"
                for i, (d, a) in enumerate(zip(is_target, is_anomaly))]
        file = f"ground_truth_{machine}_section_00_test.csv"
        (root / "ground_truth_data" / file).write_text("".join(f"{n},{v}\n" for n, v in zip(names, is_anomaly)))
        (root / "ground_truth_domain" / file).write_text("".join(f"{n},{v}\n" for n, v in zip(names, is_target)))
        (root / "ground_truth_attributes" / file).write_text("".join(f"{n},{f}\n" for n, f in zip(names, full)))
        truth[(machine, "00")] = (names, is_anomaly, is_target, {n: f + ".wav" for n, f in zip(names, full)})
    return truth


def test_dcase_score_2026_names_equal_the_evaluator_formula(tmp_path, capsys):
    """`dcase-score` on DCASE 2026 evaluation names (anonymised, and full names through ground_truth_attributes,
    rows shuffled) equals the evaluator's formula computed independently, and the project's definitions."""
    truth = make_2026_gt(tmp_path / "gt", np.random.default_rng(26))
    scores = made_up_scores(truth, seed=26)
    write_scores(tmp_path / "anon", truth, scores)
    got = run_json(capsys, tmp_path / "anon", tmp_path / "gt")
    assert [s["machine"] for s in got["sections"]] == sorted(MACHINES_2026_EVAL)
    assert got["official_score"] == pytest.approx(evaluator_formula(truth, scores), abs=1e-12)
    assert got == {"official_score": pytest.approx(expected_json(truth, scores)["official_score"], abs=1e-12),
                   "sections": [{k: (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v) for k, v in s.items()}
                                for s in expected_json(truth, scores)["sections"]]}
    write_scores(tmp_path / "full", truth, scores, name_of=lambda key, name: truth[key][3][name], shuffle_seed=5)
    assert run_json(capsys, tmp_path / "full", tmp_path / "gt") == got


@needs_data
def test_evaluator_formula_matches_on_the_real_2022_ground_truth(capsys, tmp_path):
    truth = truth_2022()
    scores = made_up_scores(truth, seed=7)
    write_scores(tmp_path, truth, scores)
    assert run_json(capsys, tmp_path, GT_2022)["official_score"] == pytest.approx(evaluator_formula(truth, scores),
                                                                                  abs=1e-12)
