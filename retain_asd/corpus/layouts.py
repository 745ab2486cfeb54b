"""Raw corpus layouts -> one ``ClipRecord`` per audio file (names and folders only; no audio is decoded).

Supported machine-sound layouts (``scan_dcase``)
-------------------------------------------------
``<root>`` is one of

* ``<root>/<machine>/<split_dir>/<file>``
* ``<root>/{dev_data,eval_data}/<machine>/<split_dir>/<file>``
* ``<root>/{dev_data,eval_data}/raw/<machine>/<split_dir>/<file>`` (the DCASE 2023-2026 baselines' layout;
  ``<root>`` may also be the ``dev_data`` or ``eval_data`` folder itself)

with ``<split_dir>`` one of ``train``, ``test``, ``source_test``, ``target_test``, ``supplemental``. Other
folders are ignored; a root with no ``<machine>/<split_dir>`` folder at all is a ``LayoutError``.

File names (audio: ``.wav`` / ``.flac``, any case; other files are ignored):

==========================  ===============================================================  ============
family                       name                                                             label
==========================  ===============================================================  ============
DCASE 2020 dev              ``normal_id_00_00000000.wav`` / ``anomaly_id_00_00000000.wav``   from name
DCASE 2020 eval test        ``id_05_00000000.wav``                                           unknown
DCASE 2021-2025, MIMII DG,  ``section_00_source_train_normal_0000[_<attrs>].wav``            from name
ToyADMOS2 (2022 style)
DCASE 2021 eval test        ``section_03_source_test_0000.wav``                              via GT
DCASE 2022-2025 eval test   ``section_03_0000.wav``                                          via GT
==========================  ===============================================================  ============

``<attrs>`` is ``noAttribute``, ``key_value`` pairs (``m-n_W``, ``car_A1_spd_28V_mic_1_noise_1``), or a
free-form 2021 suffix (``strength_1_ambient``, ``0_g_25_mm_2000_mV_none``, ``A1Spd28VMic1``) that does not
split into pairs; such a suffix is kept whole as ``(("raw", suffix),)``.

MIMII DG and ToyADMOS2 releases use the same 2022-style names; we support them as a DCASE tree whose split
folders may be ``source_test`` / ``target_test`` (MIMII DG's Zenodo layout). ``dataset`` is "mimii_dg"
for MIMII DG machine types (fan, gearbox, bearing, slider, valve) and "toyadmos2" for ``Toy*`` machines
when such folders are present, or when ``scan_dcase(..., dataset=...)`` says so; otherwise a 2021+ tree
is "dcase2021+". The split and domain in a name must agree with its folder, or the file is a reject.

The name parsers live in ``names.py`` (shared with ``groundtruth.py``). Anonymised eval names are resolved
through the official evaluators' ground truth (``ground_truth_dir``, the 2021, 2022 and 2023+ layouts), read
by ``groundtruth.py``: label and domain from ``ground_truth_data`` /
``ground_truth_domain``, attributes from the 2022 ``dNp,dNv`` columns or the 2023 full name.

Class names (the paper's machine-attribute classes, 231 for DCASE 2023 dev+eval train data)
-------------------------------------------------------------------------------------------
``<machine>_sec<NN>_<attr string>`` where the attr string is the name's suffix after the clip index
(``fan_sec00_m-n_X``, ``fan_sec00_noAttribute``); a name with no suffix (2021 dev test clips, anonymised
eval clips whose attributes are unknown) gives ``<machine>_sec<NN>``. DCASE 2020: ``<machine>_id<XX>``.
Noise: ``noise_<category>``.

Noise layout (``scan_noise``)
-----------------------------
``<root>/<category>/*.wav`` plus ``<root>/categories.yaml``::

    dishes: {stationary: false}
    running_tap: {stationary: true}
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from retain_asd.corpus.groundtruth import GroundTruth, load_ground_truth
from retain_asd.corpus.names import (
    Attributes,
    LayoutError,
    dcase2020_class_name,
    file_stem,
    is_audio_file,
    is_dcase2020_name,
    machine_class_name,
    parse_dcase2020_name,
    parse_dcase_name,
)

SPLIT_DIRS = ("train", "test", "source_test", "target_test", "supplemental")
WRAPPER_DIRS = ("dev_data", "eval_data")
MIMII_DG_MACHINES = ("fan", "gearbox", "bearing", "slider", "valve")
DATASETS = ("dcase2020", "dcase2021+", "mimii_dg", "toyadmos2")

@dataclass(frozen=True)
class ClipRecord:
    """One audio file of a raw corpus, described by its path and name only."""

    path: str  # absolute
    kind: str  # "machine" | "noise"
    dataset: str  # "dcase2020" | "dcase2021+" | "mimii_dg" | "toyadmos2" | "noise"
    machine: str  # machine type ("fan"), "" for noise
    section: str  # "00"; DCASE 2020: the machine id; "" for noise
    domain: str  # "source" | "target" | "" (unknown, or noise); DCASE 2020 has none -> "source"
    split: str  # "train" | "test"
    label: str  # "normal" | "anomaly" | "unknown" (eval without ground truth)
    attributes: Attributes  # ordered (key, value) pairs, () if none
    class_name: str  # see the module docstring
    noise_category: str = ""
    stationary: bool | None = None


@dataclass
class ScanResult:
    """Records of the files that parsed, and ``(path, reason)`` for those that did not."""

    records: list[ClipRecord] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)


# -------------------------------------------------------------------------------------------- scanning

def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_audio_file(p))


def _machine_dirs(root: Path) -> list[Path]:
    """Folders ``<machine>`` holding at least one split folder, through ``dev_data``/``eval_data``/``raw``
    (the root may also be a ``dev_data`` / ``eval_data`` folder itself, with or without ``raw/``)."""
    parents = [root]
    if root.name in WRAPPER_DIRS and (root / "raw").is_dir():
        parents.append(root / "raw")
    for wrapper in WRAPPER_DIRS:
        if (root / wrapper).is_dir():
            parents.append(root / wrapper)
            if (root / wrapper / "raw").is_dir():
                parents.append(root / wrapper / "raw")
    found = []
    for parent in parents:
        for child in sorted(p for p in parent.iterdir() if p.is_dir()):
            if child.name not in WRAPPER_DIRS and any((child / s).is_dir() for s in SPLIT_DIRS):
                found.append(child)
    return found


def _family_dataset(machine: str, split_dirs: Iterable[str]) -> str:
    """Name a 2021+ tree: MIMII DG / ToyADMOS2 releases are told apart by their source_test/target_test."""
    if {"source_test", "target_test"} & set(split_dirs):
        return "toyadmos2" if machine.startswith("Toy") else "mimii_dg"
    return "dcase2021+"


def check_machine_root(root: str | Path) -> list[Path]:
    """The machine folders of a corpus root, or a LayoutError saying what the root is instead (one machine's
    folder: pass its parent). Cheap: reads folder names only, so a command can check before any work."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise LayoutError(f"{root}: corpus folder does not exist")
    machine_dirs = _machine_dirs(root)
    if not machine_dirs:
        found = sorted(p.name for p in root.iterdir())[:10]
        if any((root / s).is_dir() for s in SPLIT_DIRS):
            raise LayoutError(f"{root}: this looks like one machine's folder (it holds {found}); pass its parent, "
                              f"{root.parent}, whose subfolders are the machines")
        raise LayoutError(
            f"{root}: no machine folders found (it holds {found}); expected '<root>/<machine>/{{"
            f"{','.join(SPLIT_DIRS)}}}/<file>.wav', optionally under '<root>/{{dev_data,eval_data}}[/raw]/'")
    return machine_dirs


def scan_dcase(root: str | Path, ground_truth_dir: str | Path | None = None,
               dataset: str | None = None) -> ScanResult:
    """Scan a DCASE 2020-2025 / MIMII DG / ToyADMOS2 tree (see the module docstring) into records.

    Files whose names cannot be parsed, or whose name contradicts their folder, are returned as rejects;
    the scan itself only fails (``LayoutError``) when ``root`` holds no supported layout at all.
    ``dataset`` overrides the detected dataset name of 2021+ style files.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise LayoutError(f"{root}: corpus folder does not exist")
    if dataset is not None and dataset not in DATASETS:
        raise LayoutError(f"dataset={dataset!r}: expected one of {DATASETS}")
    machine_dirs = check_machine_root(root)

    truth = load_ground_truth(ground_truth_dir) if ground_truth_dir is not None else {}
    truth_sections = {(m, s) for m, s, _ in truth}
    result = ScanResult()
    for machine_dir in machine_dirs:
        machine = machine_dir.name
        split_dirs = [s for s in SPLIT_DIRS if (machine_dir / s).is_dir()]
        family = dataset or _family_dataset(machine, split_dirs)
        for split_dir in split_dirs:
            for path in _audio_files(machine_dir / split_dir):
                try:
                    record = _machine_record(path, machine, split_dir, family, truth, truth_sections)
                except LayoutError as err:
                    result.rejects.append((str(path), str(err)))
                else:
                    result.records.append(record)
    result.records.sort(key=lambda r: r.path)
    result.rejects.sort()
    return result


def _machine_record(path: Path, machine: str, split_dir: str, family: str, truth: GroundTruth,
                    truth_sections: set[tuple[str, str]]) -> ClipRecord:
    """One machine clip; raises ``LayoutError`` with the reason when the file must be rejected."""
    name = path.name
    if split_dir == "supplemental":
        raise LayoutError(f"{name!r}: supplemental data (DCASE 2025 clean-machine / noise-only clips) is not "
                          "ingested as machine clips")
    folder_split = "train" if split_dir == "train" else "test"
    folder_domain = split_dir.split("_")[0] if split_dir in ("source_test", "target_test") else ""
    if is_dcase2020_name(name):
        parsed = parse_dcase2020_name(name)
        return ClipRecord(path=str(path), kind="machine", dataset="dcase2020", machine=machine,
                          section=parsed.section, domain="source", split=folder_split, label=parsed.label,
                          attributes=(), class_name=dcase2020_class_name(machine, parsed.section))
    parsed = parse_dcase_name(name)
    if parsed.split and parsed.split != folder_split:
        raise LayoutError(f"{name!r}: the name says split {parsed.split!r} but the file is in {split_dir}/")
    if folder_domain and parsed.domain and parsed.domain != folder_domain:
        raise LayoutError(f"{name!r}: the name says domain {parsed.domain!r} but the file is in {split_dir}/")
    if parsed.label == "unknown" and (machine, parsed.section) in truth_sections:
        resolved = truth.get((machine, parsed.section, file_stem(name)))
        if resolved is None:
            raise LayoutError(f"{name!r}: anonymised eval name not listed in the ground truth of "
                              f"{machine} section {parsed.section}")
        if parsed.domain and resolved.domain and resolved.domain != parsed.domain:
            raise LayoutError(f"{name!r}: the name says domain {parsed.domain!r} but the ground truth says "
                              f"{resolved.domain!r}")
        parsed = replace(resolved, domain=resolved.domain or parsed.domain)
    return ClipRecord(path=str(path), kind="machine", dataset=family, machine=machine, section=parsed.section,
                      domain=parsed.domain or folder_domain, split=folder_split, label=parsed.label,
                      attributes=parsed.attributes,
                      class_name=machine_class_name(machine, parsed.section, parsed.attr_string))


# ---------------------------------------------------------------------------------------------- noise

def _yaml_hint(categories: Iterable[str]) -> str:
    return "\n".join(f"  {c}: {{stationary: false}}   # or true" for c in categories)


def read_noise_categories(path: str | Path) -> dict[str, bool]:
    """Read ``categories.yaml`` (``<category>: {stationary: true|false}``) -> ``category -> stationary``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise LayoutError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict) or not data:
        raise LayoutError(f"{path}: expected a mapping '<category>: {{stationary: true|false}}', "
                          f"found {type(data).__name__}")
    out = {}
    for category, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"stationary"} or not isinstance(entry["stationary"],
                                                                                          bool):
            raise LayoutError(f"{path}: category {category!r} must be '{{stationary: true}}' or "
                              f"'{{stationary: false}}', found {entry!r}")
        out[str(category)] = entry["stationary"]
    return out


def scan_noise(root: str | Path, categories_yaml: str | Path | None = None) -> ScanResult:
    """Scan ``<root>/<category>/*.{wav,flac}``; each category must be marked in ``categories.yaml``.

    A category folder missing from the YAML, or a YAML category with no folder, is a ``LayoutError`` that
    shows the line to add (or remove). Audio files lying directly in ``root`` are rejects.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise LayoutError(f"{root}: noise folder does not exist; expected '<root>/<category>/*.wav'")
    yaml_path = Path(categories_yaml) if categories_yaml is not None else root / "categories.yaml"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not yaml_path.is_file():
        raise LayoutError(f"{yaml_path}: missing; mark each noise category stationary or not, e.g.\n"
                          + _yaml_hint(folders or ["<category>"]))
    stationary = read_noise_categories(yaml_path)
    missing = [c for c in folders if c not in stationary]
    if missing:
        raise LayoutError(f"{yaml_path}: noise folder(s) {missing} under {root} are not listed; add:\n"
                          + _yaml_hint(missing))
    absent = sorted(c for c in stationary if c not in folders)
    if absent:
        raise LayoutError(f"{yaml_path}: lists {absent} but {root} has no such folder(s); create them or "
                          "remove those lines")
    result = ScanResult()
    for path in _audio_files(root):
        result.rejects.append((str(path), "noise file not inside a category folder; expected "
                                          "'<root>/<category>/<file>'"))
    for category in folders:
        for path in _audio_files(root / category):
            result.records.append(ClipRecord(
                path=str(path), kind="noise", dataset="noise", machine="", section="", domain="",
                split="train", label="normal", attributes=(), class_name=f"noise_{category}",
                noise_category=category, stationary=stationary[category]))
    result.records.sort(key=lambda r: r.path)
    return result


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``name`` (for error messages)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
