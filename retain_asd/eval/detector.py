"""The deployable detector behind `retain-asd score` (pipelines/score.py).

Owns choosing the normal clips of a bank (`normal_clips`: a DCASE machine folder's `train/`, never its `test/`,
never a file named `anomaly_*` / `*_anomaly_*`), building a reference bank from them (`build_reference_bank`:
embeddings + a gamma-fit decision threshold) and scoring a folder of clips against it (`score_with_bank`).
Every file is read with `audio.load_clip`, so an unreadable file is reported with its reason, never fatal;
what the read policy changed (resampling, cropping, padding) is reported per file; a silent file is scored and
flagged, never dropped (a dead microphone is a finding).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retain_asd.audio import AudioError, load_clip
from retain_asd.eval import knn, metrics
from retain_asd.eval.embed import Embedder

# DCASE names anomalous clips anomaly_* (2020) or section_XX_<domain>_<split>_anomaly_* (2021+); a bank never takes one
ANOMALY_NAMES = "anomaly_* / *_anomaly_*"
TEST_FOLDERS = ("test",)  # DCASE test clips (normal and anomalous): scored with `score clips`, never a reference


@dataclass(frozen=True)
class ReadPolicy:
    """How a file becomes a model input (`audio.load_clip`); stored with a bank so clips are read the same way."""

    sample_rate_hz: int = 16000
    clip_s: float = 10.0
    min_clip_s: float = 1.0
    pad_mode: str = "zero"
    channel: str = "mean"  # "mean" or a channel index as a string ("0")

    def load(self, path):
        channel = self.channel if self.channel == "mean" else int(self.channel)
        return load_clip(path, sample_rate_hz=self.sample_rate_hz, channel=channel, clip_s=self.clip_s,
                         min_clip_s=self.min_clip_s, pad_mode=self.pad_mode)


@dataclass(frozen=True)
class ClipRead:
    """One file as read for the detector: `name` relative to the folder given, status "ok" or "silent"."""

    path: str
    name: str
    samples: np.ndarray | None  # (S,) float32; None when unreadable
    status: str = "ok"  # "ok" | "silent" (every sample zero: scored, and flagged) | the skip reason's kind
    source_rate_hz: int = 0
    source_s: float = 0.0
    repairs: tuple[str, ...] = ()  # "resample 44100->16000", "crop 30.00s->10.00s", "pad 2.00s->10.00s"
    error: str = ""  # why an unreadable file was skipped


def read_clips(named_paths: list[tuple[str, str]], policy: ReadPolicy, keep_silent: bool) -> list[ClipRead]:
    """Each (path, name) read with `policy`; a silent file is kept as zeros (status "silent") when
    `keep_silent`, else skipped like any other unusable file."""
    import soundfile as sf

    out = []
    for path, name in named_paths:
        try:
            clip = policy.load(path)
        except AudioError as err:
            kind = err.reason.split(":")[0]
            if kind == "silent" and keep_silent:
                info = sf.info(path)
                zeros = np.zeros(int(round(policy.clip_s * policy.sample_rate_hz)), np.float32)
                out.append(ClipRead(path, name, zeros, "silent", info.samplerate, info.frames / info.samplerate))
            else:
                out.append(ClipRead(path, name, None, kind, error=str(err)))
            continue
        except (OSError, RuntimeError) as err:
            out.append(ClipRead(path, name, None, "unreadable", error=f"{path}: {err}"))
            continue
        out.append(ClipRead(path, name, clip.samples, "ok", clip.source_rate_hz,
                            clip.source_num_samples / clip.source_rate_hz, clip.repairs))
    return out


def skip_counts(reads: list[ClipRead]) -> Counter:
    """{reason kind: files} of the unreadable files."""
    return Counter(r.status for r in reads if r.samples is None)


# ---------------------------------------------------------------------------------------------------- folders
def _audio_files(folder: Path, skip_dirs: tuple[str, ...] = ()) -> list[Path]:
    from retain_asd.corpus.names import is_audio_file

    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        found += [Path(root, f) for f in files if is_audio_file(f)]
    return sorted(found)


def _is_anomaly(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith("anomaly_") or "_anomaly_" in name


def clip_files(source) -> list[tuple[str, str]]:
    """(path, name) of every audio file under a folder (names relative to it, so `sec00/a.wav` and
    `sec01/a.wav` stay apart), or of one file."""
    source = Path(source)
    if source.is_file():
        return [(str(source), source.name)]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder or file of audio clips")
    return [(str(p), p.relative_to(source).as_posix()) for p in _audio_files(source)]


@dataclass(frozen=True)
class NormalSelection:
    """What a bank reads: (path, name) of the normal clips and, for the console, what it read and left out."""

    files: list[tuple[str, str]]
    read: list[tuple[str, int]] = field(default_factory=list)  # (folder or file, audio files taken)
    not_read: list[tuple[str, int]] = field(default_factory=list)  # (folder, audio files): DCASE test folders
    anomalies: list[str] = field(default_factory=list)  # files named as anomalies inside the folders read

    def describe(self) -> list[str]:
        lines = [f"read {where}: {n} audio file(s)" for where, n in self.read]
        lines += [f"not read: {where} ({n} audio file(s); test clips are scored with `retain-asd score clips`)"
                  for where, n in self.not_read]
        if self.anomalies:
            lines.append(f"skipped {len(self.anomalies)} file(s) named {ANOMALY_NAMES} (a bank holds normal "
                         f"clips only): {', '.join(self.anomalies[:3])}{' ...' if len(self.anomalies) > 3 else ''}")
        return lines


def normal_clips(sources) -> NormalSelection:
    """The normal clips of `sources` (folders or files) for a reference bank.

    A folder with a `train/` subfolder is a DCASE machine folder: only `train/` is read. Any other folder is
    read whole except subfolders named `test` (DCASE test clips hold anomalies). Files named `anomaly_*` (2020)
    or `*_anomaly_*` (2021+) are skipped with a count; one given explicitly is an error. Names are relative to
    the folder given.
    """
    files, read, not_read, anomalies = [], [], [], []
    for source in [sources] if isinstance(sources, str | os.PathLike) else sources:
        source = Path(source)
        if source.is_file():
            if _is_anomaly(source):
                raise ValueError(f"{source}: named {ANOMALY_NAMES}, an anomalous clip; a bank holds normal "
                                 "clips only: leave it out of --normal")
            files.append((str(source), source.name))
            read.append((str(source), 1))
            continue
        if not source.is_dir():
            raise FileNotFoundError(f"{source}: no such folder or file of normal clips")
        train = source / "train"
        root = train if train.is_dir() else source
        for sub in sorted(p for p in source.iterdir() if p.is_dir() and p != train):
            if root is train or sub.name in TEST_FOLDERS:
                n = len(_audio_files(sub))
                if n:
                    not_read.append((str(sub), n))
        found = _audio_files(root, () if root is train else TEST_FOLDERS)
        anomalies += [p.relative_to(source).as_posix() for p in found if _is_anomaly(p)]
        taken = [(str(p), p.relative_to(source).as_posix()) for p in found if not _is_anomaly(p)]
        files += taken
        read.append((str(root), len(taken)))
    return NormalSelection(files, read, not_read, anomalies)


# ---------------------------------------------------------------------------------------------------- bank
def build_reference_bank(checkpoint: str | os.PathLike, normal, *, layer: int, pooling: str = "genrep",
                         k: int = 1, metric: str = "euclidean", policy: ReadPolicy = ReadPolicy(),
                         percentile: float = 90.0, batch_size: int = 16, embedder: Embedder | None = None,
                         model_uri: str = "") -> tuple[knn.MemoryBank, NormalSelection, list[ClipRead]]:
    """A deployable detector: embeddings of normal clips (`normal_clips` of `normal`, or that selection itself)
    + a decision threshold.

    Threshold = `metrics.gamma_threshold` at `percentile` (0-100, e.g. 90) of the references' own leave-one-out
    kNN scores. Returns the bank, the selection (what was read and left out) and the files that could not be
    read (a silent normal clip is one of them: it is no reference). `model_uri`: the registered version
    (``models:/NAME/VERSION``) `checkpoint` is the local copy of, kept in the bank's meta.
    """
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"--percentile {percentile}: a percentile in (0, 100), e.g. 90")
    selection = normal if isinstance(normal, NormalSelection) else normal_clips(normal)
    reads = read_clips(selection.files, policy, keep_silent=False)
    good = [r for r in reads if r.samples is not None]
    bad = [r for r in reads if r.samples is None]
    if len(good) <= k + 1:
        where = ", ".join(w for w, _ in selection.read) or str(normal)
        why = (f" ({len(bad)} skipped: " + ", ".join(f"{kind} {n}" for kind, n in sorted(skip_counts(bad).items()))
               + f"; e.g. {bad[0].error})") if bad else ""
        raise ValueError(f"{where}: {len(good)} readable normal clips{why}; a bank needs more than k + 1 = {k + 1}")
    embedder = embedder or Embedder(checkpoint, pooling=pooling, batch_size=batch_size)
    clips = np.stack([r.samples for r in good])
    emb = torch.from_numpy(embedder.embed_waveforms(clips, [layer])[layer].astype(np.float64))
    # One folder = one domain: the target bank is the source bank, so the score is d_source.
    ref_scores = knn.leave_one_out_distance(emb, k, metric)
    meta = {"files": [r.name for r in good], "read": [w for w, _ in selection.read], "layer": layer,
            "pooling": pooling, "k": k, "metric": metric, "clip_s": policy.clip_s, "policy": vars(policy).copy(),
            "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_hash": embedder.checkpoint_hash,
            "percentile": percentile, "threshold": metrics.gamma_threshold(ref_scores, percentile / 100.0),
            **({"model_uri": model_uri} if model_uri else {})}
    name = Path(selection.read[0][0]).name if selection.read else "bank"
    return knn.MemoryBank(name, emb, emb, meta), selection, bad


def bank_policy(bank: knn.MemoryBank, min_clip_s: float | None = None) -> ReadPolicy:
    """The read policy a bank was built with (older banks stored only clip_s); `min_clip_s` only decides which
    files are accepted, so the caller may change it."""
    stored = dict(bank.meta.get("policy") or {"clip_s": bank.meta.get("clip_s", 10.0)})
    if min_clip_s is not None:
        stored["min_clip_s"] = min_clip_s
    return ReadPolicy(**stored)


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class ScoredClip:
    name: str  # relative to the folder given
    score: float
    decision: int  # 1 = anomaly (score > threshold, or a silent file)
    status: str  # "ok" | "silent"
    source_rate_hz: int
    source_s: float
    repairs: tuple[str, ...]


CSV_COLUMNS = ("file", "score", "decision", "status", "source_rate_hz", "source_s", "repairs")


def csv_row(c: ScoredClip) -> tuple:
    return (c.name, f"{c.score:.6g}", c.decision, c.status, c.source_rate_hz, f"{c.source_s:.2f}",
            "; ".join(c.repairs))


def score_with_bank(bank: knn.MemoryBank, clips, checkpoint: str | os.PathLike | None = None,
                    batch_size: int = 16, min_clip_s: float | None = None
                    ) -> tuple[list[ScoredClip], list[ClipRead]]:
    """A `ScoredClip` per usable file of `clips` (a folder, or one file), and the files that could not be read.

    Files are read as the bank's were (`bank_policy`). A silent file is scored and flagged (decision 1, status
    "silent"): for a detector, a dead microphone is a finding.
    """
    meta = bank.meta
    checkpoint = checkpoint or meta["checkpoint"]
    embedder = Embedder(checkpoint, pooling=meta["pooling"], batch_size=batch_size)
    if embedder.checkpoint_hash != meta["checkpoint_hash"]:
        raise ValueError(f"{checkpoint}: weights differ from the checkpoint the bank was built with "
                         f"({meta['checkpoint']}); rebuild the bank with `retain-asd score bank`")
    reads = read_clips(clip_files(clips), bank_policy(bank, min_clip_s), keep_silent=True)
    good = [r for r in reads if r.samples is not None]
    bad = [r for r in reads if r.samples is None]
    if not good:
        return [], bad
    emb = embedder.embed_waveforms(np.stack([r.samples for r in good]), [meta["layer"]])[meta["layer"]]
    scores = bank.score(emb, k=meta["k"], metric=meta["metric"])
    flags = metrics.decisions(scores, meta["threshold"])
    return [ScoredClip(r.name, float(s), 1 if r.status == "silent" else int(d), r.status, r.source_rate_hz,
                       r.source_s, r.repairs) for r, s, d in zip(good, scores, flags)], bad


def summary(scored: list[ScoredClip], bad: list[ClipRead], threshold: float) -> str:
    """One line: n scored, n flagged, what the read policy changed, n skipped by reason."""
    flagged = sum(c.decision for c in scored)
    silent = sum(c.status == "silent" for c in scored)
    line = f"{len(scored)} clips scored, {flagged} flagged (score > {threshold:.6g}"
    line += f", or silent: {silent})" if silent else ")"
    changed = Counter(r.split()[0] for c in scored for r in c.repairs)
    words = {"resample": "resampled", "crop": "cropped", "pad": "padded", "downmix": "downmixed",
             "channel": "one channel taken"}
    if changed:
        line += "; " + ", ".join(f"{n} {words.get(kind, kind)}" for kind, n in sorted(changed.items()))
    skipped = skip_counts(bad)
    line += f"; {len(bad)} skipped" + (" (" + ", ".join(f"{kind} {n}" for kind, n in sorted(skipped.items())) + ")"
                                       if bad else "")
    return line
