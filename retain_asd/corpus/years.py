"""The DCASE Task 2 editions in one place: what each year's tree holds and how it is scored.

`YEARS` is the table (docs/dcase.md prints it with `years_markdown`); `detect_layout` tells which editions a
scanned tree can be, from its file names, sections, machine types and channel count, so the commands can say
what they read (``DCASE 2023-2025 layout``) and which channel they use.

What the commands do with a tree is the same for every year except where the table says otherwise:

* one bank of train-split normals per machine and section (source and target), tests from the test split,
  labels from the names (development) or from the evaluator's ground truth (evaluation, ``--ground-truth``);
* the figures are AUC_source and AUC_target (each over that domain's normals and every anomaly), pAUC
  (max FPR 0.1, all clips) and the official score, one harmonic mean over them all (``metrics.official_score``,
  the formula ``dcase-score`` applies); a tree without target clips (2020) gives AUC and pAUC only;
* stereo files (2026: channel 0 the near microphone, channel 1 the far one) are read through ``data.channel``
  (``0``, ``1`` or ``mean``), and the channel is named on the console, in every table and in MLflow.

Names only, plus one header read per machine folder for the channel count (soundfile); no audio is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from retain_asd.corpus.names import LayoutError


@dataclass(frozen=True)
class DcaseYear:
    """One edition of DCASE Task 2, as the commands of this project meet it."""

    year: int
    domains: bool  # source / target domains (named in train and development test files)
    sections: str  # what splits the machine types
    attributes: str  # where the attributes of a clip are published
    channels: int  # audio channels of the released files
    extra: str  # data beyond <machine>/{train,test}
    official: str  # the challenge's official score
    here: str  # what evaluate / layers / dcase-score compute for it
    ingest: str = "classes `<machine>_sec<NN>_<attributes>`"  # what ingest makes of its clips


_HMEAN_3 = "hmean over AUC_source, AUC_target, pAUC of every machine section"
YEARS: tuple[DcaseYear, ...] = (
    DcaseYear(2020, False, "machine ids (`id_00`..`id_06`)", "none", 1, "-",
              "AUC and pAUC per machine id (no domains)",
              "source only: hmean over AUC and pAUC of every machine id (no target AUC)",
              "classes `<machine>_id<XX>`"),
    DcaseYear(2021, True, "`section_00`..`02` (dev), `03`..`05` (eval)", "free-form name suffix only", 1,
              "-", "AUC and pAUC per section and domain (anomalies of that domain only)",
              f"{_HMEAN_3} (the 2022+ rules: every anomaly counts for both domains)",
              "classes `<machine>_sec<NN>[_<suffix>]`"),
    DcaseYear(2022, True, "`section_00`..`02` (dev), `03`..`05` (eval)",
              "`attributes_<NN>.csv`; eval: `ground_truth_attributes/<machine>/`", 1, "-", _HMEAN_3, _HMEAN_3),
    DcaseYear(2023, True, "`section_00` only", "`attributes_00.csv`; eval: `ground_truth_attributes/*.csv`", 1,
              "-", _HMEAN_3, _HMEAN_3),
    DcaseYear(2024, True, "`section_00` only", "`attributes_00.csv` (some machines: `noAttribute`)", 1, "-",
              _HMEAN_3, _HMEAN_3),
    DcaseYear(2025, True, "`section_00` only", "`attributes_00.csv` (some machines: `noAttribute`)", 1,
              "`supplemental/` (clean machine or noise-only clips)", _HMEAN_3, _HMEAN_3,
              "classes `<machine>_sec<NN>_<attributes>`; `supplemental/` clips are listed as rejects"),
    DcaseYear(2026, True, "`section_00` only", "in the names (2023 style); eval: evaluator ground truth", 2,
              "eval machines' additional training set (`eval_data/raw/<machine>/train/`): their references",
              f"{_HMEAN_3} (assumed: the 2026 evaluator's source was not available to check)",
              f"{_HMEAN_3}, on the channel `data.channel` names (`evaluate --channels 0,1`: both, side by side)",
              "classes as 2023; each clip read on `data.channel` (`0`, `1` or `mean`, the summary says which)"),
)
BY_YEAR = {y.year: y for y in YEARS}

# DCASE 2026 Task 2 machine types (development and evaluation); ToyCar, fan and ToyDrone also appear in other years.
MACHINES_2026 = ("ToyCar", "ToyCarEmu", "bearingEmu", "fan", "gearboxEmu", "sliderEmu", "valveEmu",
                 "BlowerDustCollector", "Sander", "SewingMachine", "ToothBrush", "ToyDrone")
_ONLY_2026 = {"ToyCarEmu", "bearingEmu", "gearboxEmu", "sliderEmu", "valveEmu", "BlowerDustCollector", "Sander",
              "SewingMachine"}
# What each channel of a 2026 file holds (the official baseline reads channel 0).
CHANNELS_2026 = {"0": "near mic", "1": "far mic", "mean": "mean of near and far mics"}


@dataclass(frozen=True)
class TreeLayout:
    """Which editions a tree can be, and how many channels its files have."""

    years: tuple[int, ...]
    channels: int

    @property
    def label(self) -> str:
        """``DCASE 2026``, ``DCASE 2023-2025``."""
        first, last = self.years[0], self.years[-1]
        return f"DCASE {first}" if first == last else f"DCASE {first}-{last}"

    @property
    def source_only(self) -> bool:
        return self.years == (2020,)

    def channel_label(self, channel: str) -> str:
        """How a table names the channel it was computed on: ``channel 0 (near mic)``, ``mono``."""
        channel = str(channel)
        if self.channels == 1:
            return "mono"
        if 2026 in self.years:
            return f"channel {channel} ({CHANNELS_2026.get(channel, 'channel ' + channel)})"
        return f"channel {channel}" if channel != "mean" else f"channel mean (of {self.channels})"

    def check_channel(self, channel: str, setting: str = "data.channel") -> None:
        """A channel index the files do not have is an error naming the setting and the choices."""
        channel = str(channel)
        if channel != "mean" and int(channel) >= self.channels:
            choices = ", ".join([str(i) for i in range(self.channels)] + ["mean"])
            raise LayoutError(f"{setting} = {channel!r}: the {self.label} files have {self.channels} channel(s); "
                              f"use one of {choices}")


def _channels(paths: Sequence[str]) -> int:
    import soundfile as sf

    counts = []
    for path in paths:
        try:
            counts.append(sf.info(path).channels)
        except (RuntimeError, OSError):  # an unreadable file is reported when it is loaded
            continue
    return max(counts, default=1)


def detect_layout(records) -> TreeLayout:
    """The editions a scanned tree (``layouts.scan_dcase`` records) can be.

    2020 from its names; 2026 from stereo files or its own machine types; otherwise sections beyond 00 mean
    2021-2022 and section 00 alone 2023-2025 (MIMII DG and ToyADMOS2 releases read as 2022).
    """
    records = list(records)
    if not records:
        raise LayoutError("no DCASE clips to describe")
    first_per_machine = list({r.machine: r.path for r in records}.values())
    channels = _channels(first_per_machine)
    if any(r.dataset == "dcase2020" for r in records):
        years: tuple[int, ...] = (2020,)
    elif channels > 1 or {r.machine for r in records} & _ONLY_2026:
        years = (2026,)
    elif any(r.section != "00" for r in records):
        years = (2021, 2022)
    else:
        years = (2023, 2024, 2025)
    return TreeLayout(years, channels)


def years_markdown() -> str:
    """The table of `YEARS` (docs/dcase.md holds it verbatim; a test keeps them equal)."""
    lines = ["| year | domains | sections | attributes | channels | extra data | official score | "
             "evaluate / layers / dcase-score here | ingest |", "|---|---|---|---|---|---|---|---|---|"]
    for y in YEARS:
        ch = "1 (mono)" if y.channels == 1 else "2: `0` near mic, `1` far mic"
        lines.append(f"| {y.year} | {'source / target' if y.domains else 'none'} | {y.sections} | {y.attributes} | "
                     f"{ch} | {y.extra} | {y.official} | {y.here} | {y.ingest} |")
    return "\n".join(lines) + "\n"
