"""The synthetic corpus: DCASE 2023 names and CSV, audio format, determinism, and that the sounds carry
what they claim (attributes, anomalies, stationarity)."""

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import yaml

from retain_asd.corpus.noises import spread_draw
from retain_asd.corpus.synth import (
    ANOMALY_KINDS,
    EVAL_WORLD,
    MACHINES,
    NOISES,
    PRETRAIN_WORLD,
    machine_clip,
    noise_clip,
    write_eval_world,
    write_pretrain_world,
    write_synthetic_corpus,
)

# The DCASE 2023 dev name, attribute string = <key>_<value> pairs.
NAME_RE = re.compile(
    r"^section_(?P<section>\d{2})_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<index>\d{4})_(?P<attrs>spd_\d+_ld_\d+)\.wav$"
)
SMALL = dict(
    machines=("fan", "pump", "gearbox"),
    train_source_per_attr=2,
    train_target_per_attr=1,
    test_per_domain=3,
    noise_clips_per_category=2,
    noise_clip_s=12.0,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Kaldi fbank on one 10 s clip: ~7 ms of CPU with one thread, ~100 ms with the default pool on
    # 2 busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("synth") / "root", seed=0, **SMALL)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _spectral_shape_db(x: np.ndarray) -> np.ndarray:
    """Time-averaged 128-bin log-mel (BEATs' Kaldi fbank) minus its mean: the spectral shape, level removed
    (clips differ in gain on purpose)."""
    fbank = torchaudio.compliance.kaldi.fbank(
        torch.from_numpy(x).float()[None] * 2**15, num_mel_bins=128, sample_frequency=16000,
        frame_length=25, frame_shift=10, dither=0.0,
    )  # (frames, 128)
    mean_db = fbank.mean(0).numpy()
    return mean_db - mean_db.mean()


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((_spectral_shape_db(a) - _spectral_shape_db(b)) ** 2)))


def test_tree_names_and_counts(corpus):
    raw = Path(corpus.machine_root) / "dev_data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["fan", "gearbox", "pump"]
    for machine in SMALL["machines"]:
        spec = MACHINES[machine]
        parsed = []
        for split in ("train", "test"):
            for path in sorted((raw / machine / split).iterdir()):
                m = NAME_RE.match(path.name)
                assert m, f"{path.name} does not follow the DCASE 2023 convention"
                assert m["split"] == split and m["section"] == "00"
                parsed.append(m.groupdict())
        counts = Counter((p["split"], p["domain"], p["label"]) for p in parsed)
        n_loads = len(spec.loads)
        assert counts == {
            ("train", "source", "normal"): len(spec.source_speeds) * n_loads * 2,
            ("train", "target", "normal"): len(spec.target_speeds) * n_loads * 1,
            ("test", "source", "normal"): 3,
            ("test", "source", "anomaly"): 3,
            ("test", "target", "normal"): 3,
            ("test", "target", "anomaly"): 3,
        }
        # Indices run 0..n-1 within each (domain, split, label), as in the DCASE sets.
        for key, n in counts.items():
            indices = sorted(int(p["index"]) for p in parsed if (p["split"], p["domain"], p["label"]) == key)
            assert indices == list(range(n))
        # Domain shift: target speeds never occur in the source domain.
        speeds = {d: {p["attrs"].split("_")[1] for p in parsed if p["domain"] == d}
                  for d in ("source", "target")}
        assert speeds == {"source": set(spec.source_speeds), "target": set(spec.target_speeds)}
    assert corpus.counts["fan/train/source/normal"] == 12
    assert corpus.counts["noise/clatter"] == 2
    assert len(corpus.clips) == 3 * (12 + 2 + 12)
    assert Counter(c.anomaly_kind for c in corpus.clips if c.label == "anomaly") == {
        kind: 3 * 2 for kind in ANOMALY_KINDS
    }


def test_audio_format(corpus):
    paths = [c.path for c in corpus.clips[::7]]
    for path in paths:
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 160000, "PCM_16")
    for _, path in corpus.noise_files:
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, 12 * 16000)


def test_attributes_csv_matches_files(corpus):
    raw = Path(corpus.machine_root) / "dev_data" / "raw"
    for machine in SMALL["machines"]:
        with open(raw / machine / "attributes_00.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["file_name", "d1p", "d1v", "d2p", "d2v"]
        files = {f"{machine}/{p.parent.name}/{p.name}" for p in (raw / machine).glob("*/*.wav")}
        assert {r[0] for r in rows[1:]} == files and len(rows) - 1 == len(files)
        for file_name, *values in rows[1:]:
            attrs = NAME_RE.match(file_name.split("/")[-1])["attrs"]
            assert "_".join(values) == attrs  # d1p_d1v_d2p_d2v == the name's attribute string


def test_categories_yaml(corpus):
    categories = yaml.safe_load((Path(corpus.noise_root) / "categories.yaml").read_text())
    assert categories == {
        "pink_hum": {"stationary": True},
        "brown_fan": {"stationary": True},
        "bursts": {"stationary": False},
        "clatter": {"stationary": False},
    }
    folders = sorted(p.name for p in Path(corpus.noise_root).iterdir() if p.is_dir())
    assert folders == sorted(PRETRAIN_WORLD.noise_categories)


def test_stationary_noise_has_steady_frame_energy(corpus):
    # Std of the 100 ms frame energy in dB: measured ~0.5-1 dB (stationary) vs ~9-17 dB (non-stationary).
    std_db = {}
    for category, path in corpus.noise_files:
        x, _ = sf.read(path)
        frames = x[: x.size // 1600 * 1600].reshape(-1, 1600)  # (frames, 100 ms)
        std_db.setdefault(category, []).append(float(np.std(10 * np.log10(np.mean(frames**2, axis=1)))))
    for category, values in std_db.items():
        if NOISES[category].stationary:
            assert max(values) < 2.0, (category, values)
        else:
            assert min(values) > 5.0, (category, values)


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_attributes_and_anomalies_change_the_sound(machine):
    spec = MACHINES[machine]
    timbre = np.ones(len(spec.harmonic_amps))

    def clip(seed, speed, load=1, kind=None):
        rng = np.random.default_rng(seed)
        return machine_clip(spec, speed, load, rng, num_samples=48000, sample_rate_hz=16000, timbre=timbre,
                            anomaly_kind=kind)

    speed = float(spec.source_speeds[0])
    normals = [clip(s, speed) for s in range(4)]
    # Measured (mean distance / mean normal-normal distance): anomalies 1.6-5.9, target speed 5.4-8.9.
    normal = np.mean([_distance(normals[i], normals[j]) for i in range(4) for j in range(i + 1, 4)])
    for kind in ANOMALY_KINDS:
        anomalies = [clip(10 + s, speed, kind=kind) for s in range(3)]
        anomaly = np.mean([_distance(a, n) for a in anomalies for n in normals])
        assert anomaly > 1.3 * normal, (kind, anomaly, normal)
    # The target speed (domain shift) moves the spectrum more than clip-to-clip variation.
    target = np.mean([_distance(clip(20 + s, float(spec.target_speeds[0])), normals[s]) for s in range(3)])
    assert target > 3.0 * normal
    # Load sets the amplitude modulation rate (1.5 x load Hz): the peak of the 10 ms frame-RMS spectrum.
    for load in (1, 2):
        x = machine_clip(spec, speed, load, np.random.default_rng(30), num_samples=64000,
                         sample_rate_hz=16000, timbre=timbre)
        envelope = np.sqrt(np.mean(x.reshape(-1, 160) ** 2, axis=1))  # (400,) at 100 Hz
        spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
        freqs_hz = np.fft.rfftfreq(envelope.size, 0.01)
        band = (freqs_hz >= 0.5) & (freqs_hz <= 6.0)
        assert freqs_hz[band][np.argmax(spectrum[band])] == pytest.approx(1.5 * load, abs=0.25)


def test_nearest_neighbour_separates_anomalies(corpus):
    # A spectral-shape nearest neighbour to the training clips of the same machine and domain
    # ranks anomalies above normals: the anomalies are audible, not only labelled.
    from sklearn.metrics import roc_auc_score

    for machine in SMALL["machines"]:
        clips = [c for c in corpus.clips if c.machine == machine]
        features = {c.path: _spectral_shape_db(sf.read(c.path, dtype="float32")[0]) for c in clips}
        bank = {d: [features[c.path] for c in clips if c.split == "train" and c.domain == d]
                for d in ("source", "target")}
        test = [c for c in clips if c.split == "test"]
        scores = []
        for c in test:
            scores.append(min(np.sqrt(np.mean((features[c.path] - b) ** 2)) for b in bank[c.domain]))
        assert roc_auc_score([c.label == "anomaly" for c in test], scores) >= 0.9, machine


def test_same_seed_same_bytes_different_seed_different(corpus, tmp_path):
    again = write_synthetic_corpus(tmp_path / "again", seed=0, **SMALL)
    reference = _hashes(Path(corpus.root))
    same = _hashes(Path(again.root))
    assert reference.pop("synth.json") == same.pop("synth.json")
    assert same == reference
    wavs = [k for k in reference if k.endswith(".wav")]
    assert len(wavs) == len(corpus.clips) + len(corpus.noise_files)

    # Another seed: every file of a smaller tree differs from its namesake (names are seed-independent).
    other = write_synthetic_corpus(tmp_path / "other", seed=1, **{**SMALL, "train_source_per_attr": 1,
                                                                  "noise_clips_per_category": 1})
    different = _hashes(Path(other.root))
    shared = [k for k in different if k.endswith(".wav") and k in reference]
    assert len(shared) >= 3 * 12 + 4
    assert all(different[k] != reference[k] for k in shared)


def test_clips_do_not_depend_on_other_counts(corpus, tmp_path):
    # Each clip has its own generator: a clip of the same name is the same bytes whatever the counts.
    fewer = write_synthetic_corpus(tmp_path / "fewer", seed=0, machines=("pump",), train_source_per_attr=1,
                                   train_target_per_attr=1, test_per_domain=2, noise_clips_per_category=1,
                                   noise_clip_s=12.0)
    base = Path(corpus.root)
    shared = [Path(p) for p in [c.path for c in fewer.clips] + [p for _, p in fewer.noise_files]
              if (base / Path(p).relative_to(fewer.root)).exists()]
    assert len(shared) >= 8 + 4  # all test clips and noises, and the first training clips
    for path in shared:
        assert path.read_bytes() == (base / path.relative_to(fewer.root)).read_bytes(), path


def test_rewrite_policy(tmp_path):
    small = dict(machines=("fan",), train_source_per_attr=1, train_target_per_attr=1, test_per_domain=1,
                 noise_categories=("bursts",), noise_clips_per_category=1, noise_clip_s=10.0)
    first = write_synthetic_corpus(tmp_path / "c", **small)
    assert first.written
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*") if p.is_file()}
    second = write_synthetic_corpus(tmp_path / "c", **small)
    assert not second.written and second.clips == first.clips
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*") if p.is_file()} == mtimes

    # New arguments replace the tree: no stale file survives.
    third = write_synthetic_corpus(tmp_path / "c", **{**small, "machines": ("pump",)})
    assert third.written
    assert not (Path(third.machine_root) / "dev_data" / "raw" / "fan").exists()

    # A folder we did not write is never deleted.
    (tmp_path / "foreign" / "machines").mkdir(parents=True)
    (tmp_path / "foreign" / "machines" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by write_synthetic_corpus"):
        write_synthetic_corpus(tmp_path / "foreign", **small)
    assert (tmp_path / "foreign" / "machines" / "keep.txt").read_text() == "mine"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"machines: unknown \['lathe'\]"):
        write_synthetic_corpus(tmp_path, machines=("lathe",))
    with pytest.raises(ValueError, match=r"noise_categories: unknown \['rain'\]"):
        write_synthetic_corpus(tmp_path, noise_categories=("rain",))
    with pytest.raises(ValueError, match="sections"):
        write_synthetic_corpus(tmp_path, sections=("0",))
    with pytest.raises(ValueError, match="train_source_per_attr=-1"):
        write_synthetic_corpus(tmp_path, train_source_per_attr=-1)
    with pytest.raises(ValueError, match="noise_clip_s"):
        write_synthetic_corpus(tmp_path, noise_clip_s=5.0)


def test_noise_spread_widens_each_parameter_range_and_keeps_the_default_draws():
    # Spread 1 is rng.uniform itself: the same numbers as before the setting (default worlds unchanged).
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [spread_draw(a)(150, 700) for _ in range(5)] == [b.uniform(150, 700) for _ in range(5)]
    # Spread 2 on (150, 700): middle 425, half width 550, floored at 150 / 2 = 75 -> uniform on [75, 975].
    draw = spread_draw(np.random.default_rng(4), 2.0)
    xs = np.array([draw(150, 700) for _ in range(4000)])
    assert 75 <= xs.min() < 80 and 970 < xs.max() <= 975
    assert abs(np.mean(xs < 150) - 75 / 900) < 0.02 and abs(np.mean(xs > 700) - 275 / 900) < 0.03
    # Spread 0.5: half as wide about the middle, uniform on [287.5, 562.5].
    draw = spread_draw(np.random.default_rng(5), 0.5)
    xs = np.array([draw(150, 700) for _ in range(4000)])
    assert 287.5 <= xs.min() < 290 and 560 < xs.max() <= 562.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spread="):
            spread_draw(np.random.default_rng(0), bad)


@pytest.mark.parametrize("category", ["hvac", "transformer", "passby"])
def test_noise_spread_makes_a_categorys_recordings_differ_more(category):
    # Mean pairwise spectral-shape distance (dB) of 6 recordings of 4 s: 0.21 / 0.62 / 0.44 at spread 1,
    # 0.29 / 0.83 / 0.72 at spread 2 (measured); at least 20% more at spread 2.
    def variation(spread):
        xs = [noise_clip(category, np.random.default_rng([0, 2, 9, i]), num_samples=64000, sample_rate_hz=16000,
                         spread=spread) for i in range(6)]
        return np.mean([_distance(x, y) for i, x in enumerate(xs) for y in xs[i + 1:]])

    assert variation(2.0) > 1.2 * variation(1.0)


def test_noise_spread_rewrites_the_noise_only(tmp_path):
    small = dict(machines=("fan",), train_source_per_attr=1, train_target_per_attr=1, test_per_domain=1,
                 noise_categories=("bursts", "clatter"), noise_clips_per_category=1, noise_clip_s=10.0)
    plain = write_synthetic_corpus(tmp_path / "plain", **small)
    wide = write_synthetic_corpus(tmp_path / "wide", noise_spread=2.0, **small)
    stamps = [yaml.safe_load((tmp_path / d / "synth.json").read_text())["params"] for d in ("plain", "wide")]
    assert "noise_spread" not in stamps[0] and stamps[1]["noise_spread"] == 2.0
    for clip, other in zip(plain.clips, wide.clips, strict=True):
        assert Path(clip.path).read_bytes() == Path(other.path).read_bytes()
    for (_, p), (_, q) in zip(plain.noise_files, wide.noise_files, strict=True):
        assert Path(p).read_bytes() != Path(q).read_bytes()
    with pytest.raises(ValueError, match="spread=0"):
        write_synthetic_corpus(tmp_path / "bad", noise_spread=0, **small)
    assert not (tmp_path / "bad").exists()


def test_layouts_read_the_tree(corpus):
    # The ingestion path: the same scanner as for real DCASE trees parses every file, with no reject.
    layouts = pytest.importorskip("retain_asd.corpus.layouts")
    machines = layouts.scan_dcase(corpus.machine_root)
    assert machines.rejects == []
    got = sorted((Path(r.path).name, r.machine, r.domain, r.split, r.label, tuple(r.attributes))
                 for r in machines.records)
    want = sorted((Path(c.path).name, c.machine, c.domain, c.split, c.label, c.attributes)
                  for c in corpus.clips)
    assert got == want
    noises = layouts.scan_noise(corpus.noise_root)
    assert noises.rejects == []
    assert sorted((r.noise_category, r.stationary) for r in noises.records) == sorted(
        (c, NOISES[c].stationary) for c, _ in corpus.noise_files
    )


# --- the two worlds of the protocol (paper Sec. 4.1) ---------------------------------------------------

TINY_WORLD = dict(train_source_per_attr=1, train_target_per_attr=1, test_per_domain=3, clip_s=2.0,
                  noise_clips_per_category=2, noise_clip_s=12.0)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    return write_pretrain_world(root / "pretrain", **TINY_WORLD), write_eval_world(root / "eval", **TINY_WORLD)


def _content_hashes(corpus) -> dict[str, str]:
    """path -> sha1 of the decoded samples, for every clip and noise recording."""
    paths = [c.path for c in corpus.clips] + [p for _, p in corpus.noise_files]
    return {p: hashlib.sha1(sf.read(p, dtype="float32")[0].tobytes()).hexdigest() for p in paths}


def test_worlds_share_no_type_no_noise_category_no_recording(worlds):
    pre, ev = worlds
    assert (pre.world, ev.world) == ("pretrain", "eval")
    pre_types = {p.name for p in (Path(pre.machine_root) / "dev_data" / "raw").iterdir()}
    ev_types = {p.name for p in (Path(ev.machine_root) / "dev_data" / "raw").iterdir()}
    assert pre_types == set(PRETRAIN_WORLD.machines) and len(pre_types) >= 5
    assert ev_types == set(EVAL_WORLD.machines) and len(ev_types) >= 3
    assert not pre_types & ev_types
    pre_noise = yaml.safe_load((Path(pre.noise_root) / "categories.yaml").read_text())
    ev_noise = yaml.safe_load((Path(ev.noise_root) / "categories.yaml").read_text())
    assert not set(pre_noise) & set(ev_noise)
    # Content: no recording of one world is in the other (decoded audio and file bytes), none twice in one.
    pre_hash, ev_hash = _content_hashes(pre), _content_hashes(ev)
    assert len(set(pre_hash.values())) == len(pre_hash) and len(set(ev_hash.values())) == len(ev_hash)
    assert not set(pre_hash.values()) & set(ev_hash.values())
    pre_bytes = {hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in pre_hash}
    assert not pre_bytes & {hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in ev_hash}


def test_pretrain_world_labels_and_noise(worlds):
    from retain_asd.corpus import layouts

    pre, _ = worlds
    scan = layouts.scan_dcase(pre.machine_root)
    assert scan.rejects == [] and len(scan.records) == len(pre.clips)
    for machine in PRETRAIN_WORLD.machines:
        train = [r for r in scan.records if r.machine == machine and r.split == "train"]
        # Attributes (speed, load) give the machine-attribute classes the tagging loss learns.
        assert {tuple(k for k, _ in r.attributes) for r in train} == {("spd", "ld")}
        spec = MACHINES[machine]
        assert len({r.class_name for r in train}) == len(spec.source_speeds + spec.target_speeds) * len(spec.loads)
        assert {r.domain for r in train} == {"source", "target"}
    noise = layouts.scan_noise(pre.noise_root)
    roles = {r.noise_category: r.stationary for r in noise.records}
    assert len(roles) == 4 and sorted(roles.values()) == [False, False, True, True]  # 4 classes as the paper


def test_eval_world_labels_domains_and_factory_noise(worlds):
    from retain_asd.corpus import layouts

    _, ev = worlds
    scan = layouts.scan_dcase(ev.machine_root)
    assert scan.rejects == []
    for machine in EVAL_WORLD.machines:
        mine = [r for r in scan.records if r.machine == machine]
        counts = Counter((r.split, r.domain, r.label) for r in mine)
        for domain in ("source", "target"):
            assert counts[("train", domain, "normal")] >= 1  # references of both domains
            assert counts[("test", domain, "normal")] == counts[("test", domain, "anomaly")] == 3
        # Domain shift: target speeds never occur in the source domain.
        speeds = {d: {dict(r.attributes)["spd"] for r in mine if r.domain == d} for d in ("source", "target")}
        assert speeds == {"source": set(MACHINES[machine].source_speeds),
                          "target": set(MACHINES[machine].target_speeds)}
        kinds = {c.anomaly_kind for c in ev.clips if c.machine == machine and c.label == "anomaly"}
        assert kinds == set(ANOMALY_KINDS)
    # The eval-set builder takes Factory A from stationary and Factory B from non-stationary categories
    # (the `stationary` column that scan_noise reads from categories.yaml).
    noise = layouts.scan_noise(ev.noise_root)
    assert sorted({(r.noise_category, r.stationary) for r in noise.records}) == sorted(
        (c, NOISES[c].stationary) for c in EVAL_WORLD.noise_categories)
    assert {r.stationary for r in noise.records} == {True, False}
    std_db = {}
    for category, path in ev.noise_files:  # stationarity is audible (see test_stationary_noise_...)
        x, _ = sf.read(path)
        frames = x[: x.size // 1600 * 1600].reshape(-1, 1600)
        std_db.setdefault(category, []).append(float(np.std(10 * np.log10(np.mean(frames**2, axis=1)))))
    for category, values in std_db.items():
        assert (max(values) < 2.0) if NOISES[category].stationary else (min(values) > 5.0), (category, values)


def test_world_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"\['fan'\] are not in the eval world"):
        write_eval_world(tmp_path / "e", machines=("bearing", "fan"))
    with pytest.raises(ValueError, match=r"\['hvac'\] are not in the pretrain world"):
        write_pretrain_world(tmp_path / "p", noise_categories=("hvac",))
    with pytest.raises(ValueError, match="needs a stationary category"):
        write_eval_world(tmp_path / "e", noise_categories=("hvac", "transformer"))
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()
