"""Layouts: every supported name format, the real evaluator ground truth, and trees built from real clips."""

import csv
import shutil
from pathlib import Path

import pytest

from retain_asd.corpus.groundtruth import load_ground_truth
from retain_asd.corpus.layouts import ClipRecord, read_noise_categories, scan_dcase, scan_noise
from retain_asd.corpus.names import (
    LayoutError,
    ParsedName,
    parse_attribute_string,
    parse_dcase2020_name,
    parse_dcase_name,
    read_attributes_csv,
)

GT_2021 = "csv/dcase2021_eval_ground_truth"
GT_2022 = "csv/dcase2022_eval_ground_truth"


# ------------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("name, expected", [
    ("normal_id_00_00000000.wav", ParsedName("00", "source", "", "normal", "00000000")),
    ("anomaly_id_01_00000000.wav", ParsedName("01", "source", "", "anomaly", "00000000")),
    ("id_05_00000123.wav", ParsedName("05", "source", "", "unknown", "00000123")),  # 2020 eval test
])
def test_parse_dcase2020_name(name, expected):
    assert parse_dcase2020_name(name) == expected


@pytest.mark.parametrize("name, expected", [
    # DCASE 2023 dev fan (format_examples/dcase2023t2_dev_fan_attributes_00...csv)
    ("fan/train/section_00_source_train_normal_0000_m-n_X.wav",
     ParsedName("00", "source", "train", "normal", "0000", "m-n_X", (("m-n", "X"),))),
    # DCASE 2025 dev fan
    ("section_00_source_train_normal_0003_n_B.wav",
     ParsedName("00", "source", "train", "normal", "0003", "n_B", (("n", "B"),))),
    # DCASE 2023 eval full name as in the evaluator's ground_truth_attributes (no extension)
    ("section_00_target_test_anomaly_0012_car_C1_spd_1_mic_2",
     ParsedName("00", "target", "test", "anomaly", "0012", "car_C1_spd_1_mic_2",
                (("car", "C1"), ("spd", "1"), ("mic", "2")))),
    # DCASE 2022 valve section 05 full name
    ("section_05_target_test_anomaly_0000_v1pat_05_v2pat_05.wav",
     ParsedName("05", "target", "test", "anomaly", "0000", "v1pat_05_v2pat_05",
                (("v1pat", "05"), ("v2pat", "05")))),
    # DCASE 2024/2025 machines without attributes
    ("section_00_source_train_normal_0000_noAttribute.wav",
     ParsedName("00", "source", "train", "normal", "0000", "noAttribute", ())),
    # DCASE 2021 free-form suffixes: kept whole
    ("section_00_source_train_normal_0000_strength_1_ambient.wav",
     ParsedName("00", "source", "train", "normal", "0000", "strength_1_ambient",
                (("raw", "strength_1_ambient"),))),
    ("section_00_source_train_normal_0000_0_g_25_mm_2000_mV_none.wav",
     ParsedName("00", "source", "train", "normal", "0000", "0_g_25_mm_2000_mV_none",
                (("raw", "0_g_25_mm_2000_mV_none"),))),
    ("section_01_target_train_normal_0002_A1Spd28VMic1.WAV",
     ParsedName("01", "target", "train", "normal", "0002", "A1Spd28VMic1", (("raw", "A1Spd28VMic1"),))),
    # DCASE 2021 dev test: no suffix
    ("section_00_source_test_anomaly_0000.wav", ParsedName("00", "source", "test", "anomaly", "0000")),
    # DCASE 2021 eval test (domain in the name, label hidden)
    ("section_03_target_test_0007.wav", ParsedName("03", "target", "test", "unknown", "0007")),
    # DCASE 2022-2025 eval test (domain and label hidden)
    ("section_03_0000.flac", ParsedName("03", "", "test", "unknown", "0000")),
])
def test_parse_dcase_name(name, expected):
    assert parse_dcase_name(name) == expected


@pytest.mark.parametrize("name", [
    "section_0_source_train_normal_0000.wav",  # one-digit section
    "section_00_source_valid_normal_0000.wav",  # unknown split
    "section_00_source_train_broken_0000.wav",  # unknown label
    "normal_id_00_00000000.wav",  # a 2020 name is not a 2021+ name
    "fan_0001.wav",
])
def test_parse_dcase_name_rejects_with_the_name_and_the_expected_form(name):
    with pytest.raises(LayoutError, match=r"not a DCASE 2021-2025 name; expected 'section_XX_") as err:
        parse_dcase_name(name)
    assert name in str(err.value)


def test_parse_dcase2020_name_rejects():
    with pytest.raises(LayoutError, match=r"'normal_id_0_1\.wav': not a DCASE 2020 name"):
        parse_dcase2020_name("normal_id_0_1.wav")


def test_parse_attribute_string():
    assert parse_attribute_string("") == ()
    assert parse_attribute_string("noAttribute") == ()
    assert parse_attribute_string("spd_28V_mic_1") == (("spd", "28V"), ("mic", "1"))
    assert parse_attribute_string("a__b") == (("raw", "a__b"),)  # an empty token is not a pair


# ---------------------------------------------------------------------------------------- attribute CSVs

def test_ragged_valve_attributes_05_reads_both_row_widths(shared_data):
    path = shared_data / GT_2022 / "ground_truth_attributes/valve/attributes_05.csv"
    table = read_attributes_csv(path)
    assert len(table) == 200
    # 6-column row: two pairs, the trailing full name is not an attribute
    assert table["valve/test/section_05_0000.wav"] == (("v1pat", "05"), ("v2pat", "05"))
    # 4-column rows: one pair (the columns say v1pat even where the full name says v2pat)
    assert table["valve/test/section_05_0001.wav"] == (("v1pat", "05"),)
    assert table["valve/test/section_05_0010.wav"] == (("v1pat", "04"),)
    widths = {len(v) for v in table.values()}
    assert widths == {1, 2}
    assert sum(len(v) == 1 for v in table.values()) == 100  # the file has 100 rows of 4 columns


def test_attributes_csv_2023_and_2025_format_examples(shared_data):
    ex = shared_data / "csv/format_examples"
    t23 = read_attributes_csv(ex / "dcase2023t2_dev_fan_attributes_00.EXCERPT_first10rows.csv")
    assert len(t23) == 10
    assert t23["fan/train/section_00_source_train_normal_0000_m-n_X.wav"] == (("m-n", "X"),)
    assert t23["fan/train/section_00_source_train_normal_0001_m-n_W.wav"] == (("m-n", "W"),)
    t25 = read_attributes_csv(ex / "dcase2025t2_dev_fan_attributes_00.EXCERPT_first10rows.csv")
    assert t25["fan/train/section_00_source_train_normal_0000_n_B.wav"] == (("n", "B"),)
    # the pairs in the CSV agree with the pairs in each file name
    for name, pairs in t23.items():
        assert parse_dcase_name(name).attributes == pairs


def test_attributes_csv_tolerates_missing_values_and_padding(tmp_path):
    path = tmp_path / "attributes_00.csv"
    path.write_text("file_name,d1p,d1v,d2p,d2v\n"
                    "a.wav,spd,28V,mic\n"          # value of the last key missing
                    "b.wav,spd,28V,,\n"            # empty padding pair
                    "c.wav\n"                      # no attributes at all
                    "\n")                          # blank line
    assert read_attributes_csv(path) == {"a.wav": (("spd", "28V"), ("mic", "")),
                                         "b.wav": (("spd", "28V"),), "c.wav": ()}


def test_attributes_csv_bad_header_names_the_file(tmp_path):
    path = tmp_path / "attributes_00.csv"
    path.write_text("name,a,b\nx.wav,1,2\n")
    with pytest.raises(LayoutError, match=r"attributes_00\.csv: expected a header 'file_name,d1p"):
        read_attributes_csv(path)


# ------------------------------------------------------------------------------------------ ground truth

def _binary_csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {row[0]: row[1] for row in csv.reader(f)}


def test_ground_truth_2022_matches_the_official_files(shared_data):
    gt_dir = shared_data / GT_2022
    truth = load_ground_truth(gt_dir)
    assert len(truth) == 7 * 3 * 200
    fan = [truth[("fan", "03", f"section_03_{i:04d}")] for i in range(4)]
    # ground_truth_data: 0,0,0,1 ; ground_truth_domain: 0,0,1,0 ; attributes: X, W, Y, W
    assert [p.label for p in fan] == ["normal", "normal", "normal", "anomaly"]
    assert [p.domain for p in fan] == ["source", "source", "target", "source"]
    assert [p.attr_string for p in fan] == ["m-n_X", "m-n_W", "m-n_Y", "m-n_W"]
    assert fan[0] == ParsedName("03", "source", "test", "normal", "0000", "m-n_X", (("m-n", "X"),))
    assert truth[("valve", "05", "section_05_0001")].attributes == (("v1pat", "05"),)
    # every label and domain equals the official 0/1 files (what the evaluator scores with)
    for csv_path in sorted((gt_dir / "ground_truth_data").glob("*.csv")):
        _, _, machine, _, section, _ = csv_path.stem.split("_")
        labels = _binary_csv(csv_path)
        domains = _binary_csv(gt_dir / "ground_truth_domain" / csv_path.name)
        for wav, value in labels.items():
            parsed = truth[(machine, section, wav[:-4])]
            assert parsed.label == ("anomaly" if value == "1" else "normal")
            assert parsed.domain == ("target" if domains[wav] == "1" else "source")


def test_ground_truth_2021_domain_from_file_name(shared_data):
    gt_dir = shared_data / GT_2021
    truth = load_ground_truth(gt_dir)
    csv_paths = sorted((gt_dir / "ground_truth_data").glob("*.csv"))
    assert len(csv_paths) == 7 * 3 * 2
    assert len(truth) == sum(len(_binary_csv(p)) for p in csv_paths) == 8635  # files hold 200-235 rows
    # ground_truth_fan_section_03_source_test.csv row 0: 1 ; ..._target_test.csv rows 0, 1: 1, 0
    assert truth[("fan", "03", "section_03_source_test_0000")] == ParsedName(
        "03", "source", "test", "anomaly", "0000")
    assert truth[("fan", "03", "section_03_target_test_0001")] == ParsedName(
        "03", "target", "test", "normal", "0001")


def test_ground_truth_2023_layout(tmp_path):
    # A hand-made ground-truth folder in the nttcslab/dcase2023_task2_evaluator layout (three rows).
    gt = tmp_path / "gt"
    (gt / "ground_truth_data").mkdir(parents=True)
    (gt / "ground_truth_domain").mkdir()
    (gt / "ground_truth_attributes").mkdir()
    name = "ground_truth_ToyDrone_section_00_test.csv"
    (gt / "ground_truth_data" / name).write_text("section_00_0000.wav,1\nsection_00_0001.wav,0\n"
                                                 "section_00_0002.wav,0\n")
    (gt / "ground_truth_domain" / name).write_text("section_00_0000.wav,1\nsection_00_0001.wav,1\n"
                                                   "section_00_0002.wav,0\n")
    (gt / "ground_truth_attributes" / name).write_text(
        "section_00_0000.wav,section_00_target_test_anomaly_0012_car_C1_spd_1_mic_2\n"
        "section_00_0001.wav,section_00_target_test_normal_0031_car_C1_spd_1_mic_2\n"
        "section_00_0002.wav,section_00_source_test_normal_0031_car_B2_spd_2_mic_1\n")
    truth = load_ground_truth(gt)
    assert truth[("ToyDrone", "00", "section_00_0000")] == ParsedName(
        "00", "target", "test", "anomaly", "0000", "car_C1_spd_1_mic_2",
        (("car", "C1"), ("spd", "1"), ("mic", "2")))
    assert truth[("ToyDrone", "00", "section_00_0002")].attr_string == "car_B2_spd_2_mic_1"
    assert truth[("ToyDrone", "00", "section_00_0002")].domain == "source"


def test_ground_truth_dir_without_data_folder_is_an_error(tmp_path):
    with pytest.raises(LayoutError, match="ground_truth_data"):
        load_ground_truth(tmp_path)


# ---------------------------------------------------------------------------------------------- scanning

def test_scan_resolves_2022_anonymised_eval_names(shared_data, tmp_path, write_wav):
    root = tmp_path / "dcase2022"
    test_dir = root / "eval_data" / "raw" / "fan" / "test"
    for i in range(4):
        write_wav(test_dir / f"section_03_{i:04d}.wav")
    write_wav(test_dir / "section_03_0999.wav")  # not in the ground truth -> reject
    write_wav(test_dir / "section_09_0000.wav")  # section without ground truth -> label unknown
    write_wav(root / "eval_data" / "raw" / "valve" / "test" / "section_05_0001.wav")
    result = scan_dcase(root, ground_truth_dir=shared_data / GT_2022)
    got = {Path(r.path).name: r for r in result.records if r.machine == "fan"}
    assert got["section_03_0000.wav"] == ClipRecord(
        path=str((test_dir / "section_03_0000.wav").resolve()), kind="machine", dataset="dcase2021+",
        machine="fan", section="03", domain="source", split="test", label="normal",
        attributes=(("m-n", "X"),), class_name="fan_sec03_m-n_X")
    first4 = [got[f"section_03_{i:04d}.wav"] for i in range(4)]
    assert [(r.label, r.domain) for r in first4] == [
        ("normal", "source"), ("normal", "source"), ("normal", "target"), ("anomaly", "source")]
    assert got["section_09_0000.wav"].label == "unknown"
    assert got["section_09_0000.wav"].domain == ""
    assert got["section_09_0000.wav"].class_name == "fan_sec09"
    valve = [r for r in result.records if r.machine == "valve"]
    assert [(r.class_name, r.attributes) for r in valve] == [("valve_sec05_v1pat_05", (("v1pat", "05"),))]
    assert len(result.rejects) == 1
    path, reason = result.rejects[0]
    assert path.endswith("section_03_0999.wav") and "not listed in the ground truth" in reason


def test_scan_resolves_2021_eval_names(shared_data, tmp_path, write_wav):
    root = tmp_path / "dcase2021"
    write_wav(root / "fan" / "test" / "section_03_source_test_0000.wav")
    write_wav(root / "fan" / "test" / "section_03_target_test_0001.wav")
    write_wav(root / "fan" / "train" / "section_03_source_train_normal_0000_strength_1_ambient.wav")
    result = scan_dcase(root, ground_truth_dir=shared_data / GT_2021)
    assert result.rejects == []
    assert [(r.split, r.domain, r.label, r.class_name) for r in result.records] == [
        ("test", "source", "anomaly", "fan_sec03"),
        ("test", "target", "normal", "fan_sec03"),
        ("train", "source", "normal", "fan_sec03_strength_1_ambient"),
    ]
    # without ground truth the labels stay unknown, the domain still comes from the name
    bare = scan_dcase(root)
    assert [(r.domain, r.label) for r in bare.records[:2]] == [("source", "unknown"), ("target", "unknown")]


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def test_scan_dcase2023_tree_from_real_clips(shared_data, tmp_path, write_wav):
    # Real DCASE 2020 clips renamed into the DCASE 2023 convention (attributes invented for the test).
    clips = sorted((shared_data / "machine/dcase2020t2_dev_id00/train").glob("*.wav"))[:4]
    anomaly = shared_data / "machine/dcase2020t2_dev_id00/test/anomaly_id_00_00000000.wav"
    toy = shared_data / "machine/dcase2020t2_dev_id01_toycar"
    root = tmp_path / "dcase2023" / "dev_data" / "raw"
    fan = root / "fan"
    expected_names = [
        ("fan/train/section_00_source_train_normal_0000_m-n_X.wav", clips[0]),
        ("fan/train/section_00_source_train_normal_0001_m-n_W.wav", clips[1]),
        ("fan/train/section_00_source_train_normal_0002_m-n_X.wav", clips[2]),
        ("fan/train/section_00_target_train_normal_0000_m-n_Y.wav", clips[3]),
        ("fan/test/section_00_source_test_anomaly_0000_m-n_X.wav", anomaly),
        ("ToyCar/train/section_00_source_train_normal_0000_car_A1_spd_28V_mic_1.wav",
         toy / "normal_id_01_00000000.wav"),
        ("ToyCar/test/section_00_target_test_anomaly_0000_car_A2_spd_31V_mic_1.wav",
         toy / "anomaly_id_01_00000000.wav"),
    ]
    for rel, src in expected_names:
        _copy(src, root / rel)
    write_wav(fan / "train" / "section_00_source_train_normal_0003_noAttribute.FLAC", fmt="FLAC")
    # things that must be ignored or rejected, never crash the scan
    (fan / "attributes_00.csv").write_text("file_name,d1p,d1v\n")
    (fan / "train" / "notes.txt").write_text("not audio")
    write_wav(fan / "train" / "junk.wav")
    write_wav(fan / "train" / "section_00_source_test_normal_0000_m-n_X.wav")  # test clip in train/
    write_wav(fan / "supplemental" / "section_00_source_supplemental_0000.wav")
    result = scan_dcase(tmp_path / "dcase2023")

    records = {str(Path(r.path).relative_to(root)): r for r in result.records}
    assert list(records) == sorted(records)  # deterministic order
    assert set(records) == {rel for rel, _ in expected_names} | {
        "fan/train/section_00_source_train_normal_0003_noAttribute.FLAC"}
    fields = {rel: (r.machine, r.section, r.domain, r.split, r.label, r.attributes, r.class_name)
              for rel, r in records.items()}
    assert fields["fan/train/section_00_source_train_normal_0001_m-n_W.wav"] == (
        "fan", "00", "source", "train", "normal", (("m-n", "W"),), "fan_sec00_m-n_W")
    assert fields["fan/train/section_00_target_train_normal_0000_m-n_Y.wav"] == (
        "fan", "00", "target", "train", "normal", (("m-n", "Y"),), "fan_sec00_m-n_Y")
    assert fields["fan/test/section_00_source_test_anomaly_0000_m-n_X.wav"] == (
        "fan", "00", "source", "test", "anomaly", (("m-n", "X"),), "fan_sec00_m-n_X")
    assert fields["fan/train/section_00_source_train_normal_0003_noAttribute.FLAC"][-2:] == (
        (), "fan_sec00_noAttribute")
    assert fields["ToyCar/test/section_00_target_test_anomaly_0000_car_A2_spd_31V_mic_1.wav"] == (
        "ToyCar", "00", "target", "test", "anomaly", (("car", "A2"), ("spd", "31V"), ("mic", "1")),
        "ToyCar_sec00_car_A2_spd_31V_mic_1")
    assert {r.dataset for r in result.records} == {"dcase2021+"}
    assert all(Path(r.path).is_absolute() and r.kind == "machine" for r in result.records)

    reasons = {Path(p).name: reason for p, reason in result.rejects}
    assert set(reasons) == {"junk.wav", "section_00_source_test_normal_0000_m-n_X.wav",
                            "section_00_source_supplemental_0000.wav"}
    assert "not a DCASE 2021-2025 name" in reasons["junk.wav"]
    misplaced = reasons["section_00_source_test_normal_0000_m-n_X.wav"]
    assert "says split 'test' but the file is in train/" in misplaced
    assert "supplemental" in reasons["section_00_source_supplemental_0000.wav"]


def test_scan_dcase2020_tree_from_real_clips(shared_data, tmp_path):
    src = shared_data / "machine"
    _copy(src / "dcase2020t2_dev_id00/train/normal_id_00_00000000.wav",
          tmp_path / "fan/train/normal_id_00_00000000.wav")
    _copy(src / "dcase2020t2_dev_id00/test/anomaly_id_00_00000000.wav",
          tmp_path / "fan/test/anomaly_id_00_00000000.wav")
    _copy(src / "dcase2020t2_dev_id01_toycar/anomaly_id_01_00000000.wav",
          tmp_path / "ToyCar/test/anomaly_id_01_00000000.wav")
    _copy(src / "dcase2020t2_dev_id01_toycar/normal_id_01_00000000.wav",
          tmp_path / "ToyCar/test/id_01_00000007.wav")  # renamed like a 2020 eval test clip
    result = scan_dcase(tmp_path)
    assert result.rejects == []
    assert [(r.machine, r.section, r.domain, r.split, r.label, r.class_name, r.dataset)
            for r in result.records] == [
        ("ToyCar", "01", "source", "test", "anomaly", "ToyCar_id01", "dcase2020"),
        ("ToyCar", "01", "source", "test", "unknown", "ToyCar_id01", "dcase2020"),
        ("fan", "00", "source", "test", "anomaly", "fan_id00", "dcase2020"),
        ("fan", "00", "source", "train", "normal", "fan_id00", "dcase2020"),
    ]


def test_scan_mimii_dg_and_toyadmos2_release_folders(tmp_path, write_wav):
    write_wav(tmp_path / "bearing/train/section_00_source_train_normal_0000_vel_6_loc_A.wav")
    write_wav(tmp_path / "bearing/source_test/section_00_source_test_normal_0000_vel_6_loc_A.wav")
    write_wav(tmp_path / "bearing/target_test/section_00_target_test_anomaly_0000_vel_10_loc_B.wav")
    # a source-domain clip in target_test/ -> reject
    write_wav(tmp_path / "bearing/target_test/section_00_source_test_normal_0001_vel_6_loc_A.wav")
    write_wav(tmp_path / "ToyTrain/source_test/section_01_source_test_normal_0000_car_A1_spd_6_mic_1.wav")
    result = scan_dcase(tmp_path)
    assert [(r.machine, r.dataset, r.split, r.domain, r.label) for r in result.records] == [
        ("ToyTrain", "toyadmos2", "test", "source", "normal"),
        ("bearing", "mimii_dg", "test", "source", "normal"),
        ("bearing", "mimii_dg", "test", "target", "anomaly"),
        ("bearing", "mimii_dg", "train", "source", "normal"),
    ]
    assert len(result.rejects) == 1
    assert "says domain 'source' but the file is in target_test/" in result.rejects[0][1]
    assert {r.dataset for r in scan_dcase(tmp_path, dataset="dcase2021+").records} == {"dcase2021+"}


def test_scan_dcase_layout_errors(tmp_path, write_wav):
    with pytest.raises(LayoutError, match="does not exist"):
        scan_dcase(tmp_path / "missing")
    write_wav(tmp_path / "flat" / "section_00_source_train_normal_0000_a_b.wav")
    with pytest.raises(LayoutError, match=r"flat: no machine folders found .*expected '<root>/<machine>/"):
        scan_dcase(tmp_path / "flat")
    (tmp_path / "ok" / "fan" / "train").mkdir(parents=True)
    with pytest.raises(LayoutError, match="dataset='dcase2099'"):
        scan_dcase(tmp_path / "ok", dataset="dcase2099")


# ------------------------------------------------------------------------------------------------- noise

def _noise_tree(shared_data: Path, root: Path) -> None:
    for category, name in [("bike", "exercise_bike.wav"), ("tap", "running_tap.wav"),
                           ("dishes", "doing_the_dishes.wav")]:
        _copy(shared_data / "noise" / name, root / category / name)


def test_scan_noise_real_files(shared_data, tmp_path, write_wav):
    _noise_tree(shared_data, tmp_path)
    (tmp_path / "categories.yaml").write_text("bike: {stationary: true}\ntap: {stationary: true}\n"
                                              "dishes: {stationary: false}\n")
    write_wav(tmp_path / "loose.wav")
    result = scan_noise(tmp_path)
    assert [(r.class_name, r.noise_category, r.stationary, Path(r.path).name) for r in result.records] == [
        ("noise_bike", "bike", True, "exercise_bike.wav"),
        ("noise_dishes", "dishes", False, "doing_the_dishes.wav"),
        ("noise_tap", "tap", True, "running_tap.wav"),
    ]
    kinds = {(r.kind, r.dataset, r.machine, r.split) for r in result.records}
    assert kinds == {("noise", "noise", "", "train")}
    assert [Path(p).name for p, _ in result.rejects] == ["loose.wav"]


def test_scan_noise_category_missing_from_yaml_shows_the_line_to_add(shared_data, tmp_path):
    _noise_tree(shared_data, tmp_path)
    yaml_path = tmp_path / "cats.yaml"
    yaml_path.write_text("bike: {stationary: true}\ntap: {stationary: true}\n")
    with pytest.raises(LayoutError, match=r"\['dishes'\].*add:\n  dishes: \{stationary: false\}"):
        scan_noise(tmp_path, categories_yaml=yaml_path)


def test_scan_noise_yaml_errors(tmp_path, write_wav):
    write_wav(tmp_path / "hum" / "a.wav")
    with pytest.raises(LayoutError, match=r"categories\.yaml: missing.*\n  hum: \{stationary: false\}"):
        scan_noise(tmp_path)
    (tmp_path / "categories.yaml").write_text("hum: {stationary: true}\nwind: {stationary: false}\n")
    with pytest.raises(LayoutError, match=r"lists \['wind'\] but .* has no such folder"):
        scan_noise(tmp_path)
    (tmp_path / "categories.yaml").write_text("hum: {stationary: maybe}\n")
    with pytest.raises(LayoutError, match=r"category 'hum' must be '\{stationary: true\}'"):
        read_noise_categories(tmp_path / "categories.yaml")
