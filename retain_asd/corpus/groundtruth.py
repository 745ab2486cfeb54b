"""The one reader of an official evaluator's ground-truth folder (DCASE 2021-2025 Task 2).

Layouts (``<m>`` machine type, ``<NN>`` two-digit section; CSVs without a header unless said):

* 2021 (y-kawagu/dcase2021_task2_evaluator): ``ground_truth_data/ground_truth_<m>_section_<NN>_{source,
  target}_test.csv`` rows ``wav_name,0|1`` (0 normal, 1 anomaly); the domain is in the file name, and the
  two files of a section form one section here.
* 2022 (Kota-Dohi/dcase2022_evaluator): ``ground_truth_data/ground_truth_<m>_section_<NN>_test.csv``
  (label), ``ground_truth_domain/<same name>`` (0 source, 1 target), and optionally
  ``ground_truth_attributes/<m>/attributes_<NN>.csv`` (header ``file_name,d1p,d1v,...,
  file_name_with_full_attributes``; rows may be ragged).
* 2023+ (nttcslab/dcase2023_task2_evaluator): data and domain as 2022, and optionally
  ``ground_truth_attributes/ground_truth_<m>_section_<NN>_test.csv`` rows ``wav_name,<full name without .wav>``
  (used instead of a 2022 attributes file of the same section).

What each row holds (``TruthRow``):

* label and domain always from ``ground_truth_data`` / ``ground_truth_domain`` (what the evaluators score
  with); a 2022+ data file whose domain file lists other names is an error naming both files;
* the attribute string from the 2022 ``dNp,dNv`` columns, or from the 2023 full name. The 2022
  ``file_name_with_full_attributes`` column is *not* trusted for labels or attributes: for ToyCar and
  ToyTrain about half of its domain/normal-anomaly tokens contradict the official label files, and in
  ``valve/attributes_05.csv`` it says ``v2pat`` where the columns say ``v1pat``;
* the full name (2022 last column, 2023 second column, with ``.wav``): the alias a submission may use for
  the clip instead of its anonymised name.

Every problem is a ``LayoutError`` (a ``ValueError``) naming the file; a missing folder or file is a
``GroundTruthNotFound``, which is also a ``FileNotFoundError``. ``load_ground_truth`` is the view that
``layouts.scan_dcase`` resolves anonymised eval names with; ``eval.dcase_files.read_ground_truth`` is the
view that ``dcase-score`` scores with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from retain_asd import fsio
from retain_asd.corpus.names import (
    LayoutError,
    ParsedName,
    file_stem,
    is_audio_file,
    parse_attribute_string,
    parse_dcase_name,
    read_attributes_rows,
    read_csv_rows,
)

_GT_FILE = re.compile(
    r"^ground_truth_(?P<machine>.+?)_section_(?P<section>\d{2})_(?:(?P<domain>source|target)_)?test$")
_GT_FILE_EXPECTED = "'ground_truth_<machine>_section_<NN>_test.csv' (2021: '..._section_<NN>_{source|target}_test.csv')"

GroundTruth = dict[tuple[str, str, str], ParsedName]  # (machine, section, anonymised stem) -> resolved name


class GroundTruthNotFound(LayoutError, FileNotFoundError):
    """A ground-truth folder or file that should be there is not."""


@dataclass(frozen=True)
class TruthRow:
    """One clip of the ground truth."""

    wav_name: str  # bare name as ground_truth_data lists it ("section_03_0000.wav")
    label: str  # "normal" | "anomaly"
    domain: str  # "source" | "target"
    attr_string: str = ""  # "m-n_X", "noAttribute"; "" where the folder publishes no attributes for the clip
    full_name: str = ""  # "section_03_source_test_normal_0000_m-n_X.wav"; "" where not published

    @property
    def stem(self) -> str:
        return file_stem(self.wav_name)


@dataclass(frozen=True)
class TruthSection:
    """The ground truth of one machine/section, rows sorted by wav name."""

    machine: str
    section: str  # "03"
    rows: tuple[TruthRow, ...]


def _read_flags(path: Path, meaning: str) -> dict[str, tuple[str, int]]:
    """Rows ``wav_name,0|1`` (no header) -> ``stem -> (bare wav name, 0|1)``."""
    if not path.is_file():
        raise GroundTruthNotFound(f"{path}: file not found")
    out: dict[str, tuple[str, int]] = {}
    for row_no, row in enumerate(read_csv_rows(path), start=1):
        cells = [cell.strip() for cell in row]
        try:
            value = float(cells[1]) if len(cells) >= 2 else -1.0
        except ValueError:
            value = -1.0
        if value not in (0.0, 1.0):
            raise LayoutError(f"{path}: row {row_no}: expected rows 'wav_name,0|1' ({meaning}; these files have "
                              f"no header row) but found {','.join(row)!r}")
        name = Path(cells[0]).name
        if file_stem(name) in out:
            raise LayoutError(f"{path}: {name!r} appears twice")
        out[file_stem(name)] = (name, int(value))
    if not out:
        raise LayoutError(f"{path}: no rows; expected rows 'wav_name,0|1' ({meaning})")
    return out


def _read_full_names_2023(path: Path) -> dict[str, tuple[str, str]]:
    """2023+ ``ground_truth_<m>_section_<NN>_test.csv``: ``stem -> (attr string, full name with .wav)``."""
    out = {}
    for row in read_csv_rows(path):
        if len(row) < 2:
            raise LayoutError(f"{path}: expected rows 'wav_name,<full file name>' but found {','.join(row)!r}")
        full = Path(row[1].strip()).name
        try:
            attr_string = parse_dcase_name(full).attr_string
        except LayoutError as err:
            raise LayoutError(f"{path}: {err}") from None
        out[file_stem(row[0].strip())] = (attr_string, full if is_audio_file(full) else f"{full}.wav")
    return out


def _read_attributes_2022(path: Path) -> dict[str, tuple[str, str]]:
    """2022 ``attributes_<NN>.csv``: ``stem -> (attr string from the dNp/dNv columns, full name or "")``."""
    out = {}
    for file_name, (pairs, full_name) in read_attributes_rows(path).items():
        attr_string = "_".join(f"{k}_{v}" for k, v in pairs) if pairs else "noAttribute"
        out[file_stem(file_name)] = (attr_string, Path(full_name).name if full_name else "")
    return out


def _section_attributes(gt_dir: Path, machine: str, section: str,
                        stems: set[str]) -> dict[str, tuple[str, str]]:
    """``stem -> (attr string, full name)`` for one section, from whichever attributes file it has."""
    attr_dir = gt_dir / "ground_truth_attributes"
    path_2023 = attr_dir / f"ground_truth_{machine}_section_{section}_test.csv"
    path_2022 = attr_dir / machine / f"attributes_{section}.csv"
    if path_2023.is_file():
        path, table = path_2023, _read_full_names_2023(path_2023)
    elif path_2022.is_file():
        path, table = path_2022, _read_attributes_2022(path_2022)
    else:
        return {}
    if stray := sorted(set(table) - stems):
        raise LayoutError(f"{path}: lists {len(stray)} clips that ground_truth_data does not list for {machine} "
                          f"section {section}, e.g. {stray[:3]}")
    full_names = [full for _, full in table.values() if full]
    if len(set(full_names)) != len(full_names):
        twice = sorted({f for f in full_names if full_names.count(f) > 1})
        raise LayoutError(f"{path}: the full names {twice[:3]} stand for more than one clip")
    return table


def read_truth_sections(ground_truth_dir: str | Path) -> list[TruthSection]:
    """Every machine/section of an evaluator ground-truth folder (2021, 2022 or 2023+ layout, see above).

    Sections are sorted by (machine, section). A name listed twice in a section, a misnamed file in
    ``ground_truth_data``, or a folder with no section at all is an error.
    """
    gt_dir = Path(ground_truth_dir)
    data_dir = gt_dir / "ground_truth_data"
    if not data_dir.is_dir():
        raise GroundTruthNotFound(
            f"{data_dir}: not found; expected an evaluator ground-truth folder holding 'ground_truth_data/"
            "ground_truth_<machine>_section_<NN>[_source|_target]_test.csv' (and ground_truth_domain/ for 2022+)")
    # (machine, section) -> stem -> (row, the file that listed it)
    sections: dict[tuple[str, str], dict[str, tuple[TruthRow, Path]]] = {}
    for path in fsio.visible(data_dir.glob("*.csv")):  # not the temp files of a writer
        match = _GT_FILE.match(path.stem)
        if match is None:
            raise LayoutError(f"{path}: not a ground-truth file name; expected {_GT_FILE_EXPECTED}")
        labels = _read_flags(path, "0 normal, 1 anomaly")
        if match["domain"]:  # 2021: the domain is in the file name
            domains = {stem: (name, int(match["domain"] == "target")) for stem, (name, _) in labels.items()}
        else:
            domain_path = gt_dir / "ground_truth_domain" / path.name
            domains = _read_flags(domain_path, "0 source, 1 target")
            if set(domains) != set(labels):
                diff = sorted(set(domains) ^ set(labels))
                raise LayoutError(f"{domain_path} and {path} list different wav names, e.g. {diff[:3]}")
        rows = sections.setdefault((match["machine"], match["section"]), {})
        for stem, (name, label) in labels.items():
            if stem in rows:
                raise LayoutError(f"{path}: {name!r} is also listed in {rows[stem][1]}")
            row = TruthRow(name, "anomaly" if label else "normal", "target" if domains[stem][1] else "source")
            rows[stem] = (row, path)
    if not sections:
        raise LayoutError(f"{data_dir}: no ground-truth files; expected {_GT_FILE_EXPECTED}")
    out = []
    for (machine, section), rows in sorted(sections.items()):
        attributes = _section_attributes(gt_dir, machine, section, set(rows))
        resolved = [TruthRow(row.wav_name, row.label, row.domain, *attributes.get(stem, ("", "")))
                    for stem, (row, _) in rows.items()]
        out.append(TruthSection(machine, section, tuple(sorted(resolved, key=lambda r: r.wav_name))))
    return out


def load_ground_truth(ground_truth_dir: str | Path) -> GroundTruth:
    """``(machine, section, anonymised stem) -> ParsedName`` with the official label and domain and, where
    published, the attributes (the view ``scan_dcase`` resolves anonymised eval names with)."""
    truth: GroundTruth = {}
    for section in read_truth_sections(ground_truth_dir):
        for row in section.rows:
            truth[(section.machine, section.section, row.stem)] = ParsedName(
                section=section.section, domain=row.domain, split="test", label=row.label,
                index=row.stem.rsplit("_", 1)[-1], attr_string=row.attr_string,
                attributes=parse_attribute_string(row.attr_string))
    return truth
