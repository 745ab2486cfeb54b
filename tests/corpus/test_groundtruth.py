"""groundtruth.py: the one reader of an evaluator ground-truth folder, and the two views built on it."""

import csv
from pathlib import Path

import pytest

from retain_asd.corpus.groundtruth import (
    GroundTruthNotFound,
    TruthRow,
    load_ground_truth,
    read_truth_sections,
)
from retain_asd.corpus.names import LayoutError
from retain_asd.eval.dcase_files import read_ground_truth

GT_2021 = "csv/dcase2021_eval_ground_truth"
GT_2022 = "csv/dcase2022_eval_ground_truth"


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [row for row in csv.reader(f) if row]


def _assert_views_agree(gt_dir: Path, sections) -> None:
    """Both adapters give every row of the core reader, with the same label and domain."""
    parsed = load_ground_truth(gt_dir)
    truths = read_ground_truth(gt_dir)
    assert [(t.machine, t.section) for t in truths] == [(s.machine, s.section) for s in sections]
    assert len(parsed) == sum(len(s.rows) for s in sections)
    for section, truth in zip(sections, truths):
        assert truth.wav_names == tuple(r.wav_name for r in section.rows)
        for row, is_anomaly, is_target in zip(section.rows, truth.is_anomaly, truth.is_target):
            name = parsed[(section.machine, section.section, row.wav_name.removesuffix(".wav"))]
            assert name.label == ("anomaly" if is_anomaly else "normal") == row.label
            assert name.domain == ("target" if is_target else "source") == row.domain
            assert name.attr_string == row.attr_string
        assert truth.aliases == {r.full_name: r.wav_name for r in section.rows if r.full_name}


def test_real_2022_folder(shared_data):
    gt_dir = shared_data / GT_2022
    sections = read_truth_sections(gt_dir)
    assert len(sections) == 21 and [len(s.rows) for s in sections] == [200] * 21
    assert {s.machine for s in sections} == {"ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve"}
    # every row against the official 0/1 files, read here with plain csv
    for s in sections:
        name = f"ground_truth_{s.machine}_section_{s.section}_test.csv"
        labels = dict(_csv_rows(gt_dir / "ground_truth_data" / name))
        domains = dict(_csv_rows(gt_dir / "ground_truth_domain" / name))
        assert [r.wav_name for r in s.rows] == sorted(labels)
        assert [r.label for r in s.rows] == ["anomaly" if labels[r.wav_name] == "1" else "normal" for r in s.rows]
        assert [r.domain for r in s.rows] == ["target" if domains[r.wav_name] == "1" else "source" for r in s.rows]
        assert all(r.attr_string and r.full_name.endswith(".wav") for r in s.rows)
    by_key = {(s.machine, s.section): s for s in sections}
    assert by_key[("fan", "03")].rows[0] == TruthRow(
        "section_03_0000.wav", "normal", "source", "m-n_X", "section_03_source_test_normal_0000_m-n_X.wav")
    # attributes from the dNp/dNv columns; the full name (which says v2pat) is only an alias
    valve = by_key[("valve", "05")].rows[1]
    assert (valve.attr_string, valve.full_name) == ("v1pat_05", "section_05_source_test_normal_0001_v2pat_05.wav")
    # the ToyCar full-name column contradicts the label files; labels and domains still come from them
    toycar = by_key[("ToyCar", "03")].rows[0]
    assert (toycar.label, toycar.domain, toycar.attr_string) == ("anomaly", "target", "car_G2")
    _assert_views_agree(gt_dir, sections)


def test_real_2021_folder(shared_data):
    gt_dir = shared_data / GT_2021
    sections = read_truth_sections(gt_dir)
    assert len(sections) == 21
    assert sum(len(s.rows) for s in sections) == 8635
    fan03 = {r.wav_name: r for r in next(s for s in sections if (s.machine, s.section) == ("fan", "03")).rows}
    assert fan03["section_03_source_test_0000.wav"] == TruthRow("section_03_source_test_0000.wav", "anomaly", "source")
    assert fan03["section_03_target_test_0001.wav"] == TruthRow("section_03_target_test_0001.wav", "normal", "target")
    # both domain files of a section are one section; the domain is the file name's
    for s in sections:
        for domain in ("source", "target"):
            path = gt_dir / "ground_truth_data" / f"ground_truth_{s.machine}_section_{s.section}_{domain}_test.csv"
            listed = dict(_csv_rows(path))
            got = {r.wav_name: r for r in s.rows if r.domain == domain}
            assert {n: ("1" if r.label == "anomaly" else "0") for n, r in got.items()} == listed
    _assert_views_agree(gt_dir, sections)


# -------------------------------------------------------------------------------------- hand-made folders

def _write_2023(gt: Path, labels: str, domains: str, full_names: str | None = None,
                name: str = "ground_truth_gadget_section_00_test.csv") -> Path:
    for sub, text in (("ground_truth_data", labels), ("ground_truth_domain", domains),
                      ("ground_truth_attributes", full_names)):
        if text is not None:
            (gt / sub).mkdir(parents=True, exist_ok=True)
            (gt / sub / name).write_text(text)
    return gt


def test_2023_layout_rows_and_aliases(tmp_path):
    gt = _write_2023(tmp_path, "section_00_0001.wav,0\nsection_00_0000.wav,1\n",
                     "section_00_0000.wav,1\nsection_00_0001.wav,0\n",
                     "section_00_0000.wav,section_00_target_test_anomaly_0003_a_1\n"
                     "section_00_0001.wav,section_00_source_test_normal_0007_noAttribute\n")
    (section,) = read_truth_sections(gt)
    assert (section.machine, section.section) == ("gadget", "00")
    assert section.rows == (
        TruthRow("section_00_0000.wav", "anomaly", "target", "a_1", "section_00_target_test_anomaly_0003_a_1.wav"),
        TruthRow("section_00_0001.wav", "normal", "source", "noAttribute",
                 "section_00_source_test_normal_0007_noAttribute.wav"),
    )
    (truth,) = read_ground_truth(gt)
    assert truth.aliases == {"section_00_target_test_anomaly_0003_a_1.wav": "section_00_0000.wav",
                             "section_00_source_test_normal_0007_noAttribute.wav": "section_00_0001.wav"}


def test_domain_file_with_other_names_names_both_files(tmp_path):
    gt = _write_2023(tmp_path, "section_00_0000.wav,1\nsection_00_0001.wav,0\n",
                     "section_00_0000.wav,1\nsection_00_0002.wav,0\n")
    for reader in (read_truth_sections, load_ground_truth, read_ground_truth):
        with pytest.raises(LayoutError, match=r"ground_truth_domain/\S+ and \S+ground_truth_data/\S+ list "
                                              r"different wav names, e.g. \['section_00_0001', 'section_00_0002'\]"):
            reader(gt)


def test_missing_folder_or_domain_file_is_both_error_types(tmp_path):
    for reader in (read_truth_sections, load_ground_truth, read_ground_truth):
        with pytest.raises(GroundTruthNotFound, match="ground_truth_data: not found") as err:
            reader(tmp_path)
        assert isinstance(err.value, LayoutError) and isinstance(err.value, FileNotFoundError)
    _write_2023(tmp_path, "section_00_0000.wav,1\n", None)
    with pytest.raises(FileNotFoundError, match=r"ground_truth_domain/ground_truth_gadget_section_00_test\.csv: "
                                                "file not found"):
        read_ground_truth(tmp_path)


def test_bad_files_are_errors_naming_the_file(tmp_path):
    gt = _write_2023(tmp_path / "a", "wav_name,label\nsection_00_0000.wav,1\n", "section_00_0000.wav,1\n")
    with pytest.raises(LayoutError, match=r"section_00_test\.csv: row 1: expected rows 'wav_name,0\|1'"):
        read_truth_sections(gt)
    gt = _write_2023(tmp_path / "b", "section_00_0000.wav,1\n", "section_00_0000.wav,1\n",
                     "section_00_0000.wav,section_00_target_test_anomaly_0000_a_1\n"
                     "section_00_0009.wav,section_00_target_test_anomaly_0009_a_1\n")
    with pytest.raises(LayoutError, match=r"ground_truth_attributes/\S+: lists 1 clips that ground_truth_data "
                                          r"does not list .*section_00_0009"):
        read_truth_sections(gt)
    gt = _write_2023(tmp_path / "c", "section_00_0000.wav,1\n", "section_00_0000.wav,1\n")
    (gt / "ground_truth_data" / "labels.csv").write_text("x.wav,1\n")  # a misnamed file is not skipped
    with pytest.raises(LayoutError, match=r"labels\.csv: not a ground-truth file name"):
        read_truth_sections(gt)
    gt = tmp_path / "d"
    (gt / "ground_truth_data").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no ground-truth files"):
        read_truth_sections(gt)


def test_2021_name_in_both_domain_files_is_an_error(tmp_path):
    data = tmp_path / "ground_truth_data"
    data.mkdir()
    (data / "ground_truth_fan_section_03_source_test.csv").write_text("section_03_source_test_0000.wav,1\n")
    (data / "ground_truth_fan_section_03_target_test.csv").write_text("section_03_source_test_0000.wav,0\n")
    with pytest.raises(LayoutError, match=r"target_test\.csv: 'section_03_source_test_0000\.wav' is also "
                                          r"listed in \S+source_test\.csv"):
        read_ground_truth(tmp_path)
