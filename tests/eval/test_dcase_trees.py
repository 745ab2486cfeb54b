"""Fig. 2 and the noise-aware view on DCASE trees built from the real clips (2023, 2025 and 2026 layouts):
`layers --dcase-root`, `evaluate --dcase-root [--channels]`, `dcase-score`, `ingest` and `score` on stereo files."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from retain_asd.models.beats import beats_tiny, write_random_checkpoint


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return (write_random_checkpoint(root / "teacher.pt", beats_tiny(), seed=0),
            write_random_checkpoint(root / "student.pt", beats_tiny(), seed=1))


def _common(tmp_path, db_name: str = "mlflow.db") -> list[str]:
    return ["--preset", "smoke", f"data.work_dir={tmp_path / 'work'}", "data.clip_s=1.0",
            f"tracking.tracking_uri=sqlite:///{tmp_path / db_name}"]


def _runs(db) -> dict:
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")}


def test_layers_on_a_2023_tree_equal_evaluate_at_every_layer(dcase_tree, encoders, tmp_path, capsys):
    """Acceptance: at every layer, `layers --dcase-root` gives the official score `evaluate --dcase-root` gives with
    eval.layer = that layer (raw and DN); the plot has one curve per encoder; the evaluate layer is marked."""
    from pipelines.evaluate import main as evaluate
    from pipelines.layers import main as layers
    from retain_asd.eval.report import layer_figure

    tree = dcase_tree(tmp_path / "dcase2023", 2023)["root"]
    teacher, student = encoders
    ckpts = ["--checkpoint", str(teacher), "--checkpoint", str(student)]
    assert layers([*ckpts, "--dcase-root", str(tree), "--out", str(tmp_path / "fig2"), *_common(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "on the DCASE 2023-2025, mono tree" in printed and "| encoder | L1 | L2 | L3 |" in printed
    md = (tmp_path / "fig2" / "layers.md").read_text()
    for name in ("teacher", "student"):  # the smoke preset's eval.layer = 2 is starred; a machine table each
        assert f"{name}: hmean of AUC_source, AUC_target, pAUC per machine section" in md
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert rows["| teacher"].split(" | ")[2].endswith("*") and rows["| fan_section_00"].count("*") == 1
    runs = _runs(tmp_path / "mlflow.db")
    client = mlflow.tracking.MlflowClient()
    per_layer = {}
    for name in ("teacher", "student"):
        run = runs[f"layers-{name}"]
        assert run.data.tags["channel"] == "mono" and run.data.tags["evaluate_layer"] == "2"
        for suffix in ("", "_dn"):
            history = client.get_metric_history(run.info.run_id, f"layerwise/dcase_official{suffix}")
            per_layer[name, suffix] = {h.step: h.value for h in history}
            assert sorted(per_layer[name, suffix]) == [1, 2, 3]
        assert "layer_3/dcase/ToyCar_section_00/hmean_dn" in run.data.metrics
    scores = {name: per_layer[name, "_dn"] for name in ("teacher", "student")}
    fig = layer_figure(scores, {"teacher": 2, "student": 2})
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["teacher", "student"]
    assert (tmp_path / "fig2" / "score_per_layer.png").stat().st_size > 1000

    for layer in (1, 2, 3):  # the student at each layer (the same code path serves every encoder)
        assert evaluate(["--checkpoint", str(student), "--dcase-root", str(tree), "--out", str(tmp_path / f"e{layer}"),
                         *_common(tmp_path), f"eval.layer={layer}"]) == 0
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        evaluated = {r.info.run_name: r for r in mlflow.search_runs(
            experiment_names=["retain-asd"], filter_string=f"tags.layers = '[{layer}]'", output_format="list")}
        m = evaluated["evaluate-student-seed0"].data.metrics
        assert m["dcase/official"] == pytest.approx(per_layer["student", ""][layer], abs=1e-12)
        assert m["dcase/official_dn"] == pytest.approx(per_layer["student", "_dn"][layer], abs=1e-12)
    assert "[DCASE 2023-2025, mono]" in capsys.readouterr().out


def test_layouts_of_each_year_and_the_docs_table(dcase_tree, tmp_path, shared_data):
    from pathlib import Path

    from retain_asd.corpus.layouts import scan_dcase
    from retain_asd.corpus.names import LayoutError
    from retain_asd.corpus.years import detect_layout, years_markdown

    found = {}
    for year in (2023, 2025, 2026):
        made = dcase_tree(tmp_path / str(year), year, eval_machines=("ToyDrone",) if year == 2026 else ())
        scan = scan_dcase(made["root"], ground_truth_dir=made["ground_truth"] if year == 2026 else None)
        found[year] = detect_layout(scan.records), scan
    assert found[2023][0].years == (2023, 2024, 2025) and found[2023][0].channels == 1
    assert found[2025][0].label == "DCASE 2023-2025"
    assert [Path(p).parent.name for p, _ in found[2025][1].rejects] == ["supplemental"] * 2  # named, not ingested
    from retain_asd.eval.dcase_mode import evaluate_dcase
    from retain_asd.eval.embed import Embedder

    embedder = Embedder(write_random_checkpoint(tmp_path / "tiny.pt", beats_tiny(), seed=2), batch_size=8)
    result = evaluate_dcase(embedder, tmp_path / "2025", [1, 3], clip_s=1.0)  # the supplemental clips stay out
    assert (result.layout, result.channel) == ("DCASE 2023-2025", "mono")
    assert sorted(result.cells[0].machines) == ["bearing_section_00", "fan_section_00"]
    assert embedder.num_clips_encoded == 2 * (8 + 6)
    layout, scan = found[2026]
    assert (layout.label, layout.channels) == ("DCASE 2026", 2)
    assert layout.channel_label("0") == "channel 0 (near mic)" and layout.channel_label("1") == "channel 1 (far mic)"
    with pytest.raises(LayoutError, match=r"data.channel = '2': the DCASE 2026 files have 2 channel\(s\)"):
        layout.check_channel("2")
    dev = scan_dcase(tmp_path / "2026" / "dev_data")  # the dev_data folder itself (holding raw/) is a root too
    assert sorted({r.machine for r in dev.records}) == ["ToyCarEmu", "fan"] and len(dev.records) == 28
    drone = [r for r in scan.records if r.machine == "ToyDrone"]  # additional training set + resolved eval tests
    assert sorted({(r.split, r.label) for r in drone}) == [("test", "anomaly"), ("test", "normal"), ("train", "normal")]
    assert sum(r.split == "train" for r in drone) == 8
    docs = Path(__file__).resolve().parents[2] / "docs" / "dcase.md"
    assert years_markdown() in docs.read_text()


def test_2026_tree_near_and_far_channels(dcase_tree, encoders, tmp_path, capsys):
    """Acceptance: channel 0 and 1 give different embeddings and labelled tables; `mean` on stereo input is named
    on the console; the eval machine's additional training set is its reference bank, scored against the
    evaluator's ground truth exactly as `dcase-score` scores the written files."""
    from pipelines.dcase_score import main as dcase_score
    from pipelines.evaluate import main as evaluate
    from pipelines.layers import main as layers
    from retain_asd.audio import load_clips
    from retain_asd.eval.embed import Embedder

    made = dcase_tree(tmp_path / "dcase2026", 2026, eval_machines=("ToyDrone",))
    root, gt = made["root"], made["ground_truth"]
    _, student = encoders
    test_clips = sorted(str(p) for p in (root / "eval_data/raw/ToyDrone/test").glob("*.wav"))
    embedder = Embedder(student, batch_size=8)
    near, far = (embedder.embed_waveforms(load_clips(test_clips, 1.0, c)[0], [2])[2] for c in (0, 1))
    assert near.shape == far.shape and np.abs(near - far).mean() > 1e-3 * np.abs(near).mean()

    argv = ["--checkpoint", str(student), "--dcase-root", str(root), "--ground-truth", str(gt)]
    assert evaluate([*argv, "--out", str(tmp_path / "mean"), *_common(tmp_path)]) == 0
    assert "[DCASE 2026, channel mean (mean of near and far mics)]" in capsys.readouterr().out

    assert evaluate([*argv, "--channels", "0,1", "--out", str(tmp_path / "nf"), *_common(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "student-ch0: dcase/official=" in printed and "[DCASE 2026, channel 1 (far mic)]" in printed
    head = next(line for line in printed.splitlines() if line.startswith("| machine section"))
    assert "channel 0 (near mic): AUC_s / AUC_t / pAUC / hmean" in head and "channel 1 (far mic)" in head
    machines = [line.split(" | ")[0][2:] for line in printed.splitlines()
                if line.startswith("| ") and "_section_" in line]
    assert machines == ["ToyCarEmu_section_00", "ToyDrone_section_00", "fan_section_00"]
    for channel, label in (("0", "near mic"), ("1", "far mic")):
        table = (tmp_path / "nf" / f"student-ch{channel}" / "dcase_table.md").read_text()
        assert table.count(f"DCASE 2026, channel {channel} ({label})") == 2  # raw and DN headers
    assert (tmp_path / "nf" / "channels_student.md").is_file()
    runs = _runs(tmp_path / "mlflow.db")
    assert {r.data.tags["channel"] for r in runs.values()} == {"channel 0 (near mic)", "channel 1 (far mic)",
                                                               "channel mean (mean of near and far mics)"}
    ch = {c: runs[f"evaluate-student-seed0-ch{c}"].data.metrics for c in "01"}
    assert ch["0"]["dcase/ToyDrone_section_00/auc_source"] != ch["1"]["dcase/ToyDrone_section_00/auc_source"] or \
        ch["0"]["dcase/fan_section_00/pauc"] != ch["1"]["dcase/fan_section_00/pauc"]

    # The written ToyDrone scores, through dcase-score and the ground truth, give the figures evaluate logged.
    assert dcase_score(["--scores", str(tmp_path / "nf/student-ch0/scores/dcase/raw"), "--ground-truth", str(gt),
                        "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    (section,) = scored["sections"]
    for key in ("auc_source", "auc_target", "pauc"):
        assert section[key] == pytest.approx(ch["0"][f"dcase/ToyDrone_section_00/{key}"], abs=1e-12)

    assert evaluate([*argv, "--out", str(tmp_path / "bad"), *_common(tmp_path), "data.channel=2"]) == 2
    assert "data.channel = '2': the DCASE 2026 files have 2 channel(s); use one of 0, 1, mean" in \
        capsys.readouterr().err

    assert layers(["--checkpoint", str(student), "--dcase-root", str(root), "--ground-truth", str(gt), "--out",
                   str(tmp_path / "fig2"), *_common(tmp_path), "data.channel=1"]) == 0
    assert "on the DCASE 2026, channel 1 (far mic) tree" in (tmp_path / "fig2" / "layers.md").read_text()


def test_ingest_and_score_read_the_channel_of_stereo_files(dcase_tree, encoders, tmp_path, capsys, ray_local,
                                                          shared_data):
    """`ingest` keeps the chosen channel of a 2026 tree and says so; `score` reads bank and clips on data.channel."""
    import shutil

    from pipelines.score import main as score
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.shards import DecodeSettings

    root = dcase_tree(tmp_path / "dcase2026", 2026, machines=("fan",))["root"]
    noise = tmp_path / "noise"
    (noise / "tap").mkdir(parents=True)
    shutil.copy(shared_data / "noise" / "running_tap.wav", noise / "tap")
    (noise / "categories.yaml").write_text("tap: {stationary: true}\n")
    summaries = {}
    for channel in ("0", "mean"):
        corpus = ingest(root, noise, tmp_path / f"corpus_{channel}", settings=DecodeSettings(clip_s=1.0,
                                                                                             channel=channel))
        summaries[channel] = corpus.summary()
        repairs = {s["repairs"] for s in corpus.machine.manifest["sources"]}
        assert repairs == ({"channel 0"} if channel == "0" else {"downmix"})
    assert "channel: data.channel = 0: 14 multi-channel files read on channel 0 only" in summaries["0"]
    assert "channel: data.channel = mean: 14 multi-channel files averaged (downmix)" in summaries["mean"]

    _, student = encoders
    machine = root / "dev_data/raw/fan"
    out = {}
    for channel in ("1", "0"):
        bank = tmp_path / f"bank{channel}.pt"
        common = ["--preset", "smoke", "data.clip_s=1.0", f"data.channel={channel}"]
        assert score(["bank", "--checkpoint", str(student), "--normal", str(machine), "--out", str(bank),
                      *common]) == 0
        capsys.readouterr()
        assert score(["clips", "--bank", str(bank), "--clips", str(machine / "test"), "--preset", "smoke"]) == 0
        out[channel] = capsys.readouterr().out
        assert "6 clips scored" in out[channel] and "6 one channel taken" in out[channel]  # never a silent downmix
    rows = {c: [line for line in text.splitlines() if ".wav," in line] for c, text in out.items()}
    assert len(rows["0"]) == len(rows["1"]) == 6 and rows["0"] != rows["1"]
