"""Label vocabulary: index order, multi-hot encoding, class-weighted sampling, JSON round trip."""

import json

import numpy as np
import pytest

from retain_asd.corpus.labels import SCHEMA_VERSION, LabelVocab, build_vocab
from retain_asd.corpus.layouts import ClipRecord


def _machine(class_name: str, split: str = "train") -> ClipRecord:
    machine, section = class_name.split("_sec")[0], "00"
    return ClipRecord(path=f"/x/{class_name}_{split}.wav", kind="machine", dataset="dcase2021+",
                      machine=machine, section=section, domain="source", split=split, label="normal",
                      attributes=(), class_name=class_name)


def _noise(category: str) -> ClipRecord:
    return ClipRecord(path=f"/n/{category}.wav", kind="noise", dataset="noise", machine="", section="",
                      domain="", split="train", label="normal", attributes=(), class_name=f"noise_{category}",
                      noise_category=category, stationary=True)


@pytest.fixture
def vocab() -> LabelVocab:
    machine = ([_machine("fan_sec00_m-n_X")] * 3 + [_machine("fan_sec00_m-n_W")]
               + [_machine("ToyCar_sec00_car_A1")] * 2
               + [_machine("valve_sec00_noAttribute", split="test")] * 5)  # test clips define no class
    noise = [_noise("tap")] * 4 + [_noise("dishes")]
    return build_vocab(machine, noise)


def test_build_vocab_sorted_classes_and_train_counts(vocab):
    assert vocab.machine_classes == ("ToyCar_sec00_car_A1", "fan_sec00_m-n_W", "fan_sec00_m-n_X")
    assert vocab.noise_classes == ("noise_dishes", "noise_tap")
    assert (vocab.num_machine, vocab.num_noise, vocab.num_classes) == (3, 2, 5)
    assert vocab.counts == {"ToyCar_sec00_car_A1": 2, "fan_sec00_m-n_W": 1, "fan_sec00_m-n_X": 3,
                            "noise_dishes": 1, "noise_tap": 4}


def test_index_machine_first_then_noise(vocab):
    assert [vocab.index(c) for c in vocab.class_names] == [0, 1, 2, 3, 4]
    assert vocab.index("fan_sec00_m-n_X") == 2
    assert vocab.index("noise_dishes") == 3
    with pytest.raises(KeyError, match=r"'fan_sec00_m-n_Z'.*close matches: \['fan_sec00_m-n_X'"):
        vocab.index("fan_sec00_m-n_Z")


def test_encode_multi_hot(vocab):
    target = vocab.encode("fan_sec00_m-n_W", "noise_tap")
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(vocab.encode("ToyCar_sec00_car_A1"), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(vocab.encode(None, "noise_dishes"), [0, 0, 0, 1, 0])
    assert vocab.encode(None).sum() == 0
    with pytest.raises(ValueError, match="is a noise class"):
        vocab.encode("noise_tap")
    with pytest.raises(ValueError, match="is a machine class"):
        vocab.encode("fan_sec00_m-n_W", "fan_sec00_m-n_X")


def test_encode_batch_equals_encode_row_by_row(vocab):
    machine_idx = np.array([0, 2, -1, 1])
    noise_idx = np.array([3, -1, 4, 4])
    batch = vocab.encode_batch(machine_idx, noise_idx)  # (4, 5)
    names = vocab.class_names
    expected = np.stack([vocab.encode(names[m] if m >= 0 else None, names[n] if n >= 0 else None)
                         for m, n in zip(machine_idx, noise_idx, strict=True)])
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(batch.sum(axis=1), [2, 1, 1, 2])
    assert batch.dtype == np.float32 and batch.shape == (4, 5)


@pytest.mark.parametrize("machine_idx, noise_idx", [([3], [4]), ([0], [2]), ([0], [5]), ([-2], [-1])])
def test_encode_batch_rejects_out_of_range(vocab, machine_idx, noise_idx):
    expected = r"machine_idx must be -1 or in \[0, 3\), noise_idx -1 or in \[3, 5\)"
    with pytest.raises(ValueError, match=expected):
        vocab.encode_batch(np.array(machine_idx), np.array(noise_idx))


def test_sampling_weights_are_inverse_counts_normalised(vocab):
    clips = ["fan_sec00_m-n_X"] * 3 + ["fan_sec00_m-n_W"] + ["ToyCar_sec00_car_A1"] * 2
    weights = vocab.sampling_weights(clips)
    # 1/count: 1/3 x3, 1 x1, 1/2 x2 -> sum 3; each class then carries 1/3 of the mass
    np.testing.assert_allclose(weights, [1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6], rtol=0, atol=1e-15)
    assert weights.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(vocab.sampling_weights(["noise_tap", "noise_dishes"]), [0.2, 0.8], atol=1e-15)
    with pytest.raises(KeyError, match="close matches"):
        vocab.sampling_weights(["fan_sec00_m-n_Q"])


def test_sampling_weights_need_a_count():
    vocab = LabelVocab(("a",), ("noise_b",), {"noise_b": 2})
    with pytest.raises(ValueError, match="class 'a' has no train clips"):
        vocab.sampling_weights(["a"])


def test_json_round_trip_is_equal_and_atomic(vocab, tmp_path):
    path = tmp_path / "sub" / "labels.json"
    vocab.to_json(path)
    again = LabelVocab.from_json(path)
    assert again == vocab
    assert [again.index(c) for c in vocab.class_names] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema_version 2, expected 1; re-run ingestion"):
        LabelVocab.from_json(path)


def test_vocab_validation():
    with pytest.raises(ValueError, match="machine_classes must be sorted and unique"):
        LabelVocab(("b", "a"), ())
    with pytest.raises(ValueError, match="both machine and noise"):
        LabelVocab(("a",), ("a",))
    with pytest.raises(ValueError, match=r"counts has classes not in the vocabulary: \['z'\]"):
        LabelVocab(("a",), (), {"z": 1})
