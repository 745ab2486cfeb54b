"""The training stream: pairing plan (pure numpy) and the Ray Data dataset on a small synthetic corpus."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from retain_asd import mixing, stream
from retain_asd.corpus.labels import LabelVocab

SNR = {"kind": "uniform", "low_db": -5.0, "high_db": 5.0}
S = 160000  # 10 s at 16 kHz


# ------------------------------------------------------------------------------------------ plan (no Ray)
def _state(counts: dict[str, int], *, bank_lengths=(S + 100, S // 3, 2 * S), class_weighted=True, seed=0,
           rows_per_file=7) -> stream.StreamState:
    """A StreamState with fake metadata: `counts` clips per class, no audio needed for planning."""
    classes = [c for c, n in counts.items() for _ in range(n)]
    vocab = LabelVocab(tuple(sorted(counts)), ("noise_a", "noise_b"), dict(counts))
    n = len(classes)
    clean = stream.CleanIndex(
        files=tuple(f"f{i}" for i in range(-(-n // rows_per_file))),
        file_idx=np.arange(n) // rows_per_file, row_in_file=np.arange(n) % rows_per_file,
        clip_ids=np.asarray([f"c{i}" for i in range(n)]),
        machine_idx=np.asarray([vocab.index(c) for c in classes]),
        weights=vocab.sampling_weights(classes), num_samples=S)
    lengths = np.asarray(bank_lengths, dtype=np.int64)
    bank = stream.NoiseBank(audio=np.zeros(0, np.float32), starts=np.zeros_like(lengths), lengths=lengths,
                            noise_ids=np.asarray([f"n{j}" for j in range(len(lengths))]),
                            noise_idx=np.asarray([len(counts) + j % 2 for j in range(len(lengths))]))
    sampler = mixing.make_snr_sampler(**SNR)
    return stream.StreamState(clean, bank, vocab.num_classes, sampler, seed, class_weighted)


def test_noise_permutation_no_repeat_until_bank_exhausted():
    rng = np.random.default_rng(0)
    order = stream.noise_permutation(5, 13, rng)
    assert len(order) == 13
    # each aligned window of 5 draws is a permutation of the bank; the tail (3 draws) has no repeat
    assert sorted(order[:5]) == sorted(order[5:10]) == [0, 1, 2, 3, 4]
    assert len(set(order[10:].tolist())) == 3
    with pytest.raises(stream.StreamError, match="empty"):
        stream.noise_permutation(0, 3, rng)


def test_noise_offsets_and_segments():
    lengths = np.asarray([S + 10, S, S // 2] * 200)
    off = stream.noise_offsets(lengths, S, np.random.default_rng(1))
    assert off[0::3].min() >= 0 and off[0::3].max() <= 10 and len(set(off[0::3].tolist())) == 11  # crop
    assert (off[1::3] == 0).all()  # exactly one clip long: the only segment
    assert off[2::3].max() < S // 2 and off[2::3].max() > S // 4  # shorter: tiled from any start
    audio = np.arange(S + 10 + 7, dtype=np.float32)
    bank = stream.NoiseBank(audio, np.asarray([0, S + 10]), np.asarray([S + 10, 7]), np.asarray(["a", "b"]),
                            np.asarray([3, 4]))
    np.testing.assert_array_equal(mixing.noise_segment(bank.recording(0), 4, S), np.arange(4, S + 4))
    tiled = mixing.noise_segment(bank.recording(1), 5, S)
    np.testing.assert_array_equal(tiled[:9], S + 10 + np.asarray([5, 6, 0, 1, 2, 3, 4, 5, 6]))


def test_class_weighted_plan_makes_classes_uniform():
    counts = {"a": 60, "b": 30, "c": 6, "d": 3}  # imbalanced 20:10:2:1
    weighted, plain = _state(counts), _state(counts, class_weighted=False)
    n = sum(counts.values())
    freq_w, freq_p = Counter(), Counter()
    for epoch in range(40):  # 40 x 99 = 3960 draws
        freq_w.update(weighted.clean.machine_idx[stream.plan_epoch(weighted, epoch).clean].tolist())
        p = stream.plan_epoch(plain, epoch)
        assert sorted(p.clean.tolist()) == list(range(n))  # plain: each clip exactly once per epoch
        freq_p.update(weighted.clean.machine_idx[p.clean].tolist())
    total = 40 * n
    share_w = np.asarray([freq_w[i] / total for i in range(4)])
    # binomial std of a 1/4 share over 3960 draws is 0.0069; 0.03 is > 4 sigma
    np.testing.assert_allclose(share_w, 0.25, atol=0.03)
    np.testing.assert_allclose([freq_p[i] / total for i in range(4)], np.asarray([60, 30, 6, 3]) / 99)


def test_plan_is_a_function_of_seed_and_epoch():
    st = _state({"a": 5, "b": 20})
    p0, again, p1 = stream.plan_epoch(st, 0), stream.plan_epoch(st, 0), stream.plan_epoch(st, 1)
    other = stream.plan_epoch(_state({"a": 5, "b": 20}, seed=1), 0)
    for name in ("clean", "noise", "noise_offset", "snr_db", "file_order"):
        np.testing.assert_array_equal(getattr(p0, name), getattr(again, name))
    assert not np.array_equal(p0.snr_db, p1.snr_db) and not np.array_equal(p0.clean, p1.clean)
    assert not np.array_equal(p0.snr_db, other.snr_db)
    assert ((p0.snr_db >= -5) & (p0.snr_db <= 5)).all()
    # noise lengths (S+100, S/3, 2S): offsets within each recording's valid range
    lengths = st.bank.lengths[p0.noise]
    assert (p0.noise_offset <= np.where(lengths >= S, lengths - S, lengths - 1)).all()


def test_mix_batch_equals_mix_at_snr():
    rng = np.random.default_rng(3)
    clean = (0.05 * rng.standard_normal((3, 4000))).astype(np.float32)
    noise = (2.0 * rng.standard_normal((3, 4000))).astype(np.float32)
    snr_db = np.asarray([-5.0, 0.0, 7.5])
    mixture, c, n = mixing.mix_batch_at_snr(clean, noise, snr_db)
    for b in range(3):
        ref = mixing.mix_at_snr(clean[b], noise[b], snr_db[b])
        np.testing.assert_allclose(c[b], ref.clean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(n[b], ref.noise, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(mixture, c + n)
    clean[1] = 0.0
    with pytest.raises(mixing.MixingError, match=r"clean row\(s\) \[1\]"):
        mixing.mix_batch_at_snr(clean, noise, snr_db)


# ------------------------------------------------------------------------------------------ Ray stream
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.synth import write_synthetic_corpus

    root = tmp_path_factory.mktemp("stream")
    # fan: 6 source classes x 3 clips, 2 target classes x 1 clip (imbalanced); 4 noise categories x 2
    synth = write_synthetic_corpus(root / "synth", seed=0, machines=("fan",), train_source_per_attr=3,
                                   train_target_per_attr=1, test_per_domain=1, noise_clips_per_category=2,
                                   noise_clip_s=11.0)
    return ingest(synth.machine_root, synth.noise_root, root / "corpus", rows_per_shard=4)


def _build(corpus, seed=0, num_epochs=2, **kw):
    return stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                     snr_sampler=SNR, seed=seed, num_epochs=num_epochs, **kw)


def _rows(plan) -> list[dict]:
    """The plan's rows with their audio formed on the consumer side (`stream.with_audio`)."""
    return [stream.with_audio(r, plan.state_ref) for r in plan.dataset.take_all()]


@pytest.fixture(scope="module")
def rows0(corpus):
    return _rows(_build(corpus))


def _key(r):
    return (int(r["epoch"]), str(r["clip_id"]), str(r["noise_id"]), int(r["noise_offset"]),
            float(r["snr_db"]))


def test_rows_are_correct_mixtures(corpus, rows0):
    from retain_asd.corpus import shards

    vocab = corpus.vocab
    machine = shards.read_table(corpus.root / "machine", ["path", "clip_id", "class_name", "split", "audio"])
    train = {cid: (cls, i) for i, (cid, cls, sp) in enumerate(zip(machine["clip_id"].to_pylist(),
             machine["class_name"].to_pylist(), machine["split"].to_pylist(), strict=True)) if sp == "train"}
    clean_audio = shards.audio_matrix(machine)
    noise = shards.read_table(corpus.root / "noise", ["path", "clip_id", "class_name", "audio"])
    noise_cls = dict(zip(noise["clip_id"].to_pylist(), noise["class_name"].to_pylist(), strict=True))
    noise_audio = dict(zip(noise["clip_id"].to_pylist(), shards.audio_list(noise), strict=True))

    plan_ids = _build(corpus, num_epochs=1).state.clean.clip_ids
    n = len(train)
    assert len(rows0) == 2 * n and Counter(int(r["epoch"]) for r in rows0) == {0: n, 1: n}
    for r in rows0:
        cls, i = train[str(r["clip_id"])]
        m, j = vocab.index(cls), vocab.index(noise_cls[str(r["noise_id"])])
        assert (int(r["machine_idx"]), int(r["noise_idx"])) == (m, j)
        assert r["label"].shape == (vocab.num_classes,) and r["label"].sum() == 2.0
        assert r["label"][m] == 1.0 and r["label"][j] == 1.0
        np.testing.assert_array_equal(r["mixture"], r["clean"] + r["noise"])
        assert str(plan_ids[int(r["clip_idx"])]) == str(r["clip_id"])
        p_clean, p_noise = mixing.power(r["clean"]), mixing.power(r["noise"])
        assert abs(p_noise - 1.0) < 1e-4
        assert abs(10 * np.log10(p_clean / p_noise) - float(r["snr_db"])) < 0.01
        # the components are the stored clip and the noise segment at noise_offset, scaled
        x1, off = clean_audio[i], int(r["noise_offset"])
        x2 = noise_audio[str(r["noise_id"])][off : off + S]
        x1_64, c_64 = x1.astype(np.float64), r["clean"].astype(np.float64)
        np.testing.assert_allclose(c_64, x1_64 * (c_64 @ x1_64 / (x1_64 @ x1_64)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["noise"], x2 / np.sqrt(mixing.power(x2)), rtol=1e-5, atol=1e-5)


def test_no_noise_repeats_within_epoch_until_bank_exhausted(corpus, rows0):
    bank = corpus.noise.num_rows
    assert bank == 8  # 4 categories x 2 recordings
    n = sum(1 for r in rows0 if int(r["epoch"]) == 0)
    for epoch in (0, 1):
        counts = Counter(str(r["noise_id"]) for r in rows0 if int(r["epoch"]) == epoch)
        # n draws over a bank of 8: every clip used floor(n/8) or ceil(n/8) times
        assert len(counts) == bank and set(counts.values()) <= {n // bank, -(-n // bank)}


def test_same_seed_same_rows_other_seed_and_epoch_differ(corpus, rows0):
    again = _rows(_build(corpus))
    assert sorted(map(_key, again)) == sorted(map(_key, rows0))
    by_key = {_key(r): r for r in rows0}
    for r in again:
        np.testing.assert_array_equal(r["clean"], by_key[_key(r)]["clean"])
        np.testing.assert_array_equal(r["noise"], by_key[_key(r)]["noise"])
    other = _rows(_build(corpus, seed=1))
    assert {_key(r) for r in other}.isdisjoint({_key(r) for r in rows0})  # continuous SNRs never coincide
    e0 = Counter((str(r["clip_id"]), str(r["noise_id"])) for r in rows0 if int(r["epoch"]) == 0)
    e1 = Counter((str(r["clip_id"]), str(r["noise_id"])) for r in rows0 if int(r["epoch"]) == 1)
    assert e0 != e1


def _probe_bank(batch, *, state_ref):
    """Runs as a Ray Data task with the ref in fn_kwargs, as the stream's UDF receives it."""
    import ray

    audio = ray.get(state_ref).bank.audio
    return {"writeable": [audio.flags.writeable], "owndata": [audio.flags.owndata]}


def test_noise_bank_is_shared_zero_copy(corpus, ray_local):
    plan = _build(corpus, num_epochs=1)
    out = ray_local.data.range(1).map_batches(_probe_bank, fn_kwargs={"state_ref": plan.state_ref}).take_all()
    # read-only and not owning its memory: a view on the shared-memory object store, not a per-task copy
    assert out == [{"writeable": False, "owndata": False}]


def test_streaming_split_and_torch_batches(corpus):
    import torch

    plan = _build(corpus, num_epochs=1, files_per_unit=1)  # 5 units: blocks for both consumers
    n = plan.rows_per_epoch
    left, right = plan.dataset.streaming_split(2, equal=False)
    import threading

    counts = {}

    def consume(name, it):
        counts[name] = sum(len(b["epoch"]) for b in stream.iter_train_batches(it, 2, seed=0,
                                                                               noise_bank=plan.state_ref))

    threads = [threading.Thread(target=consume, args=(k, it)) for k, it in (("l", left), ("r", right))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert counts["l"] > 0 and counts["r"] > 0 and counts["l"] + counts["r"] >= n - 2  # drop_last per half

    batch = next(iter(stream.iter_train_batches(plan.dataset.iterator(), 4, seed=0, noise_bank=plan.state_ref)))
    assert set(batch) == set(stream.TORCH_COLUMNS)
    assert batch["mixture"].shape == (4, S) and batch["mixture"].dtype == torch.float32
    assert batch["label"].shape == (4, plan.state.num_classes) and batch["noise_idx"].dtype == torch.int64
    torch.testing.assert_close(batch["mixture"], batch["clean"] + batch["noise"], rtol=0, atol=0)


def test_rows_are_compact_and_formed_on_the_consumer(corpus):
    """A row carries its clip as stored and the mixing decision (gains, noise recording, offset): one
    clip-length array, not three; `with_audio` / `iter_train_batches` form clean, noise and mixture."""
    plan = _build(corpus, num_epochs=1)
    row = plan.dataset.take(1)[0]
    clip_length = {k for k, v in row.items() if np.ndim(v) == 1 and np.size(v) == S}
    assert clip_length == {"clean_stored"} and row["clean_stored"].dtype == np.float32  # this corpus: float32
    formed = stream.with_audio(row, plan.state)
    rec = plan.state.bank.recording(int(row["noise_rec"]))
    segment = rec[int(row["noise_offset"]) : int(row["noise_offset"]) + S]
    np.testing.assert_array_equal(formed["clean"], row["clean_stored"] * row["clean_gain"])
    np.testing.assert_array_equal(formed["noise"], segment * row["noise_gain"])
    assert str(plan.state.bank.noise_ids[int(row["noise_rec"])]) == str(row["noise_id"])
    # the gains are Eq. 3's: the noise part has unit power, the clean part R times it
    assert abs(mixing.power(formed["noise"]) - 1.0) < 1e-4
    snr = 10 * np.log10(mixing.power(formed["clean"]) / mixing.power(formed["noise"]))
    assert abs(snr - float(row["snr_db"])) < 0.01


def test_batch_buffers_are_reused_only_once_dropped(corpus):
    """The consumer's (batch, S) buffers are recycled: a batch the loop still holds keeps its values while
    later batches are formed; a dropped batch's buffers are written again (no fresh 41 MB page faults)."""
    import torch

    plan = _build(corpus, num_epochs=4, files_per_unit=1)
    batches = stream.iter_train_batches(plan.dataset.iterator(), 4, seed=0, noise_bank=plan.state_ref,
                                        columns=("mixture", "clean", "noise", "clip_idx"), device="cpu")
    kept = next(batches)
    kept_copy = {k: v.clone() for k, v in kept.items()}
    seen_ptrs = set()
    for _ in range(6):
        batch = next(batches)
        ptr = batch["mixture"].data_ptr()
        assert ptr != kept["mixture"].data_ptr()
        seen_ptrs.add(ptr)
        del batch  # the loop lets go of it: its buffers may be reused
    for k in kept:
        assert torch.equal(kept[k], kept_copy[k]), k  # untouched while held
    assert len(seen_ptrs) <= 2  # 6 batches formed in at most 2 sets of buffers (one in use, one being filled)
    view = next(batches)["noise"][:2]  # a view keeps its batch's buffer alive too
    view_copy = view.clone()
    for _ in range(3):
        next(batches)
    assert torch.equal(view, view_copy)


def test_consumer_needs_the_streams_noise_bank(corpus):
    plan = _build(corpus, num_epochs=1)
    with pytest.raises(TypeError, match="state_ref"):
        next(stream.iter_train_batches(plan.dataset.iterator(), 2, seed=0, noise_bank=None))
    row = plan.dataset.take(1)[0]
    tiny = stream.NoiseBank(audio=np.ones(S, np.float32), starts=np.zeros(1, np.int64), lengths=np.asarray([S]),
                            noise_ids=np.asarray(["x"]), noise_idx=np.zeros(1, np.int64))
    row["noise_rec"] = np.int64(3)
    with pytest.raises(stream.StreamError, match="different streams"):
        stream.with_audio(row, tiny)


def test_clear_errors(corpus, tmp_path):
    machine, noise = corpus.root / "machine", corpus.root / "noise"
    kw = {"snr_sampler": SNR, "seed": 0}
    with pytest.raises(FileNotFoundError, match="labels.json"):
        stream.build_stream_state(machine, noise, tmp_path / "labels.json", **kw)
    vocab = corpus.vocab
    dropped = vocab.machine_classes[0]
    counts = {k: v for k, v in vocab.counts.items() if k != dropped}
    LabelVocab(vocab.machine_classes[1:], vocab.noise_classes, counts).to_json(tmp_path / "stale.json")
    with pytest.raises(stream.StreamError, match=dropped):
        stream.build_stream_state(machine, noise, tmp_path / "stale.json", **kw)
    with pytest.raises(stream.StreamError, match="160000 samples.*1000"):
        stream.build_stream_state(machine, noise, corpus.labels_path, clip_samples=1000, **kw)
    empty = tmp_path / "noise"
    empty.mkdir()
    manifest = json.loads((noise / "manifest.json").read_text())
    manifest.update(shards=[])
    (empty / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(stream.StreamError, match="noise bank is empty"):
        stream.build_stream_state(machine, empty, corpus.labels_path, **kw)
    assert Path(corpus.labels_path).is_file()


# ------------------------------------------------------------------------------------------ well-mixed batches
@pytest.fixture(scope="module")
def three_machines(tmp_path_factory, ray_local):
    """3 machines x 8 attribute classes (~100 train clips), 1 s clips, shards of 32 rows (a work unit of 2
    shards sees part of the corpus): written shuffled (as ingest does) and, for contrast, in path order (as
    before: a shard holds one machine)."""
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.shards import DecodeSettings
    from retain_asd.corpus.synth import write_synthetic_corpus

    root = tmp_path_factory.mktemp("mixed")
    synth = write_synthetic_corpus(root / "synth", seed=0, clip_s=1.0, train_source_per_attr=3,
                                   train_target_per_attr=1, test_per_domain=1, noise_clips_per_category=1,
                                   noise_clip_s=3.0)
    kw = {"settings": DecodeSettings(clip_s=1.0, audio_dtype="int16"), "rows_per_shard": 32}
    return (ingest(synth.machine_root, synth.noise_root, root / "shuffled", **kw),
            ingest(synth.machine_root, synth.noise_root, root / "path_order", shuffle_seed=None, **kw))


def _batches(corpus, batch_size=16, num_batches=30, **kw):
    from retain_asd.train.loop import BATCH_COLUMNS

    plan = stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                     snr_sampler=SNR, seed=0, num_epochs=8, clip_samples=16000, **kw)
    out = []
    for batch in stream.iter_train_batches(plan.dataset.iterator(), batch_size, seed=0, noise_bank=plan.state_ref,
                                           columns=(*BATCH_COLUMNS, "machine_idx"), device="cpu"):
        out.append(batch)
        if len(out) == num_batches:
            break
    return plan, out


def test_batches_are_well_mixed(three_machines):
    shuffled, path_order = three_machines
    num_machine = shuffled.vocab.num_machine
    iid = stream.iid_distinct_expectation(num_machine, 16)
    assert num_machine == 24 and iid == pytest.approx(24 * (1 - (23 / 24) ** 16))  # 11.85
    plan, batches = _batches(shuffled)
    assert len(plan.state.clean.files) >= 3  # more shards than a work unit reads
    mean = np.mean([len(set(b["machine_idx"].tolist())) for b in batches])
    assert mean >= 0.9 * iid, (mean, iid)
    # the stream before: shards in path order, one shard per work unit -> a batch holds a few neighbouring
    # attribute classes of one or two machines
    _, batches = _batches(path_order, files_per_unit=1)
    before = np.mean([len(set(b["machine_idx"].tolist())) for b in batches])
    assert before < 0.9 * iid, (before, iid)  # the same bar fails


def test_mixup_partner_is_another_clip_on_real_batches(three_machines):
    import torch

    from retain_asd.train import objectives as obj
    from retain_asd.train.student import _partners

    plan, batches = _batches(three_machines[0], num_batches=20)
    rng = np.random.default_rng(0)
    repeats = 0
    for batch in batches:
        clip = batch["clip_idx"].numpy()
        repeats += len(clip) - len(set(clip.tolist()))
        j = _partners(batch, rng, torch.device("cpu")).numpy()
        ids = plan.state.clean.clip_ids
        assert (ids[clip[j]] != ids[clip]).all()  # every row, linear and SNR mixup alike (one partner rule)
        x, _ = obj.linear_mixup(batch["mixture"], batch["mixture"][j], batch["label"], batch["label"][j],
                                torch.full((len(j),), 0.5))
        assert not torch.equal(x, batch["mixture"])
    assert repeats > 0  # class-weighted draws put one clip twice in a batch: roll(1) could pair it with itself


def test_int16_rows_are_mixed_without_rescaling(three_machines):
    """The stream mixes int16 shards' stored samples without the 1/32768 pass: the rows equal Eq. 3 applied
    to the rescaled float32 clips to float32 rounding (the gain may differ in its last bit)."""
    from retain_asd.corpus import shards

    corpus = three_machines[0]
    state = stream.build_stream_state(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                      snr_sampler=SNR, seed=0)
    block = next(stream.mix_unit(state, epoch=0, unit=0, rows_per_block=16, files_per_unit=2))
    ci = block["clip_idx"]
    clean = np.stack([shards.audio_matrix(shards.pq.read_table(state.clean.files[int(f)]))[int(r)]
                      for f, r in zip(state.clean.file_idx[ci], state.clean.row_in_file[ci], strict=True)])
    assert shards.pq.read_table(state.clean.files[0]).schema.field("audio").metadata[
        shards.AUDIO_DTYPE_KEY] == b"int16"
    assert block["clean_stored"].dtype == np.int16  # what crosses the object store: the stored samples
    noise = np.stack([mixing.noise_segment(state.bank.recording(int(j)), int(o), clean.shape[1])
                      for j, o in zip([list(state.bank.noise_ids).index(n) for n in block["noise_id"]],
                                      block["noise_offset"], strict=True)])
    _, clean_part, noise_part = mixing.mix_batch_at_snr(clean, noise, block["snr_db"].astype(np.float64))
    formed_clean, formed_noise, formed_mixture = stream.form_audio(block, state.bank)
    np.testing.assert_allclose(formed_clean, clean_part, rtol=2.5e-7, atol=0)  # 2 ulp: x a1, a1 within 1 ulp
    np.testing.assert_array_equal(formed_noise, noise_part)
    np.testing.assert_array_equal(formed_mixture, formed_clean + formed_noise)


def test_each_yield_leaves_the_task_as_its_own_block(three_machines):
    corpus = three_machines[0]
    plan = stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                     snr_sampler=SNR, seed=0, num_epochs=2, rows_per_block=8)
    sizes = [b.num_rows for b in plan.dataset.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert sum(sizes) == plan.num_rows and max(sizes) == 8
    assert sum(s < 8 for s in sizes) <= plan.num_epochs * -(-len(plan.state.clean.files) // 2)  # unit tails


def test_clean_level_keeps_the_stored_clip_and_the_snr(three_machines):
    """mixing.level = "clean" in the stream (int16 shards): the formed clean part is the decoded clip itself
    (its stored power), and every row's SNR is the drawn one within 0.01 dB."""
    from retain_asd.corpus import shards

    corpus = three_machines[0]
    state = stream.build_stream_state(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                      snr_sampler=SNR, seed=0, level="clean")
    block = next(stream.mix_unit(state, epoch=0, unit=0, rows_per_block=16, files_per_unit=2))
    ci = block["clip_idx"]
    decoded = np.stack([shards.audio_matrix(shards.pq.read_table(state.clean.files[int(f)]))[int(r)]
                        for f, r in zip(state.clean.file_idx[ci], state.clean.row_in_file[ci], strict=True)])
    clean, noise, _ = stream.form_audio(block, state.bank)
    np.testing.assert_allclose(clean, decoded, rtol=2.5e-7, atol=0)
    snr_db = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2, 1) / np.mean(noise.astype(np.float64) ** 2, 1))
    np.testing.assert_allclose(snr_db, block["snr_db"], atol=0.01)
    assert np.sqrt(np.mean(clean.astype(np.float64) ** 2)) < 0.2  # near the clips' own RMS, not Eq. 3's ~1.4
    with pytest.raises(ValueError, match="mixing.level"):
        stream.build_stream_state(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                  snr_sampler=SNR, seed=0, level="loud")
