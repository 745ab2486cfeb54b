"""DCASE file names and evaluator CSV rows: the parsers shared by the layout scanner (`layouts.py`) and the
ground-truth reader (`groundtruth.py`). Names only; no audio, no folder walking. The name formats are listed
in the docstring of `layouts.py`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = (".wav", ".flac")

Attributes = tuple[tuple[str, str], ...]


class LayoutError(ValueError):
    """A folder or file name matches no supported layout; the message names the path and what was expected."""



@dataclass(frozen=True)
class ParsedName:
    """What a file name says. Empty strings mean "the name does not say" (split comes from the folder)."""

    section: str
    domain: str
    split: str
    label: str
    index: str
    attr_string: str = ""
    attributes: Attributes = ()


# ----------------------------------------------------------------------------------------------- names

_DCASE2020 = re.compile(r"^(?:(?P<label>normal|anomaly)_)?id_(?P<id>\d{2})_(?P<index>\d+)$")
_DCASE = re.compile(
    r"^section_(?P<section>\d{2})_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<index>\d+)(?:_(?P<attrs>.+))?$"
)
_DCASE2021_EVAL = re.compile(r"^section_(?P<section>\d{2})_(?P<domain>source|target)_test_(?P<index>\d+)$")
_DCASE_ANON = re.compile(r"^section_(?P<section>\d{2})_(?P<index>\d+)$")

_DCASE2020_EXPECTED = "'{normal|anomaly}_id_XX_NNNNNNNN.wav' (or eval 'id_XX_NNNNNNNN.wav')"
_DCASE_EXPECTED = (
    "'section_XX_{source|target}_{train|test}_{normal|anomaly}_NNNN[_<attributes>].wav', "
    "or an eval name 'section_XX_NNNN.wav' / 'section_XX_{source|target}_test_NNNN.wav'"
)


def is_audio_file(path: str | Path) -> bool:
    """True for ``.wav`` / ``.flac`` in any case; hidden names (temp files of a writer, ``._`` forks) never."""
    path = Path(path)
    return path.suffix.lower() in AUDIO_EXTENSIONS and not path.name.startswith(".")


def file_stem(name: str) -> str:
    """File name without folders and without an audio extension (ground-truth CSVs list names both ways)."""
    base = Path(name).name
    return base[: -len(Path(base).suffix)] if is_audio_file(base) else base


def parse_attribute_string(attr_string: str) -> Attributes:
    """``"spd_28V_mic_1"`` -> ``(("spd", "28V"), ("mic", "1"))``; ``""``/``"noAttribute"`` -> ``()``.

    A suffix with an odd number of ``_``-tokens (DCASE 2021 ``strength_1_ambient``) is not a list of
    pairs; it is kept whole as ``(("raw", suffix),)`` rather than guessed apart.
    """
    if attr_string in ("", "noAttribute"):
        return ()
    tokens = attr_string.split("_")
    if len(tokens) % 2 or any(t == "" for t in tokens):
        return (("raw", attr_string),)
    return tuple(zip(tokens[0::2], tokens[1::2], strict=True))


def is_dcase2020_name(name: str) -> bool:
    """True for a DCASE 2020 Task 2 name (``normal_id_00_00000000.wav``, eval ``id_05_00000000.wav``)."""
    return _DCASE2020.match(file_stem(name)) is not None


def parse_dcase2020_name(name: str) -> ParsedName:
    """Parse a DCASE 2020 Task 2 name; ``section`` holds the machine id, domain is "source".

    ``normal_id_00_00000000.wav`` -> label "normal"; eval test ``id_05_00000000.wav`` -> label "unknown".
    """
    match = _DCASE2020.match(file_stem(name))
    if match is None:
        raise LayoutError(f"{name!r}: not a DCASE 2020 name; expected {_DCASE2020_EXPECTED}")
    return ParsedName(section=match["id"], domain="source", split="", label=match["label"] or "unknown",
                      index=match["index"])


def parse_dcase_name(name: str) -> ParsedName:
    """Parse a DCASE 2021-2025 / MIMII DG / ToyADMOS2 name (with or without folders and extension).

    Anonymised eval names give label "unknown" and, for 2022+ (``section_03_0000``), domain "" and split
    "test"; resolve them with ``groundtruth.load_ground_truth``.
    """
    stem = file_stem(name)
    match = _DCASE.match(stem)
    if match is not None:
        attr_string = match["attrs"] or ""
        return ParsedName(section=match["section"], domain=match["domain"], split=match["split"],
                          label=match["label"], index=match["index"], attr_string=attr_string,
                          attributes=parse_attribute_string(attr_string))
    match = _DCASE2021_EVAL.match(stem)
    if match is not None:
        return ParsedName(section=match["section"], domain=match["domain"], split="test", label="unknown",
                          index=match["index"])
    match = _DCASE_ANON.match(stem)
    if match is not None:
        return ParsedName(section=match["section"], domain="", split="test", label="unknown",
                          index=match["index"])
    raise LayoutError(f"{name!r}: not a DCASE 2021-2025 name; expected {_DCASE_EXPECTED}")


def machine_class_name(machine: str, section: str, attr_string: str) -> str:
    """``fan, 00, m-n_X`` -> ``fan_sec00_m-n_X``; no attribute string -> ``fan_sec00``."""
    base = f"{machine}_sec{section}"
    return f"{base}_{attr_string}" if attr_string else base


def dcase2020_class_name(machine: str, machine_id: str) -> str:
    """DCASE 2020 has no attributes: one class per machine id, ``fan_id00``."""
    return f"{machine}_id{machine_id}"


# --------------------------------------------------------------------------------------- attribute CSVs

def read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [row for row in csv.reader(f) if any(cell.strip() for cell in row)]


def read_attributes_rows(path: str | Path) -> dict[str, tuple[Attributes, str]]:
    """``file_name -> (pairs, file_name_with_full_attributes or "")`` for one ``attributes_XX.csv``."""
    path = Path(path)
    rows = read_csv_rows(path)
    if not rows or rows[0][0].strip() != "file_name":
        first = ",".join(rows[0]) if rows else "<empty file>"
        raise LayoutError(f"{path}: expected a header 'file_name,d1p,d1v,d2p,d2v,...' but found {first!r}")
    table: dict[str, tuple[Attributes, str]] = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row]
        file_name, rest = cells[0], cells[1:]
        # 2022 eval ground truth appends the full name; it ends in .wav, an attribute value never does.
        full_name = rest.pop() if rest and is_audio_file(rest[-1]) else ""
        # Ragged rows (valve/attributes_05.csv has 4- and 6-column rows): take the pairs that are there;
        # a key with its value missing gets "", an empty padding pair is dropped.
        pairs = []
        for i in range(0, len(rest), 2):
            key = rest[i]
            value = rest[i + 1] if i + 1 < len(rest) else ""
            if key or value:
                pairs.append((key, value))
        table[file_name] = (tuple(pairs), full_name)
    return table


def read_attributes_csv(path: str | Path) -> dict[str, Attributes]:
    """Read a DCASE ``attributes_XX.csv``: ``file_name -> ((d1p, d1v), (d2p, d2v), ...)``.

    Keys are the ``file_name`` cells as written (``fan/train/section_00_...wav``). Ragged rows are read
    as far as they go; a 2022 ``file_name_with_full_attributes`` last column is not an attribute.
    """
    return {name: pairs for name, (pairs, _) in read_attributes_rows(path).items()}
