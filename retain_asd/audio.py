"""Audio I/O: read, validate, downmix, resample and pad/crop clips to the model's input format.

Every clip entering the project goes through `load_clip`: 16 kHz mono float32, a fixed 10 s
(BEATs and the DCASE tasks use 10 s clips at 16 kHz). Files that cannot be used raise `AudioError`,
naming the file, the reason and the fix; files that can be repaired by policy (channels, sample rate,
length) are repaired and the repairs are listed on the returned `AudioClip`, so ingestion can record
them.

Reading uses soundfile (libsndfile); `torchaudio.load` needs torchcodec, which is not available here.
Resampling uses `torchaudio.functional.resample` (windowed-sinc, its defaults).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile as sf

from retain_asd import fsio

SAMPLE_RATE_HZ = 16000
CLIP_S = 10.0
MAX_SOURCE_S = 3600.0  # a longer file is refused before it is decoded (cut it into clips first)
DECODE_BLOCK_FRAMES = 1 << 16
KEEP_MARGIN_S = 1.0  # decoded past clip_s and cropped after resampling: the crop equals that of the whole file
UNKNOWN_FRAMES = 2**62  # libsndfile's frame count of a stream that does not say its length (FLAC total 0)

ChannelPolicy = Literal["mean"] | int
PadMode = Literal["repeat", "zero"]
PAD_MODES = ("repeat", "zero")

# libsndfile fixes up the frame count of a WAV whose data chunk runs past the end of the file and
# only says so in its log, e.g. "data : 32000 (should be 21999)".
_WAV_DATA_SIZE_RE = re.compile(r"^data\s*:\s*(-?\d+)\s*\(should be\s*(-?\d+)\)", re.MULTILINE)
# Streaming writers leave the size unset (0 or 0xFFFFFFFF); that is not truncation.
_WAV_UNSET_SIZES = (0, 0xFFFFFFFF, -1)

_HINTS = {
    "not found": "check the path",
    "empty": "re-export or drop the file",
    "unreadable": "the file is not an audio format libsndfile reads, or its header is corrupt; "
    "re-export it as WAV or FLAC",
    "truncated": "the file was cut short (interrupted copy or download); copy it again",
    "corrupt": "the audio data after the header is damaged or cut short; copy or re-export it",
    "non-finite": "the file holds NaN or Inf samples; re-export it from the source",
    "silent": "every sample is zero; drop the file",
    "too short": "drop the file or lower min_clip_s",
    "too long": "if the header claims more than the file holds, copy or re-export the file; a long recording: cut "
    "it into clips first (or raise max_source_s)",
    "channel": "pick a channel index in range or use channel='mean'",
}


class AudioError(ValueError):
    """A clip that cannot be used. `path` names the file, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str, hint: str = ""):
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}" + (f" ({hint})" if hint else "")
        super().__init__(message)

    def __reduce__(self):
        # Keep the exception picklable across Ray workers (ValueError pickles only `args`).
        return (type(self), (self.path, self.reason, self.hint))


def _error(path, kind: str, detail: str = "") -> AudioError:
    reason = kind + (f": {detail}" if detail else "")
    return AudioError(path, reason, _HINTS.get(kind, ""))


@dataclass(frozen=True)
class AudioClip:
    """A clip after the read policy, plus what the source was and what was repaired."""

    samples: np.ndarray  # (T,) float32
    sample_rate_hz: int
    source_rate_hz: int
    source_channels: int
    source_num_samples: int  # frames per channel in the file
    repairs: tuple[str, ...]  # e.g. ("downmix", "resample 44100->16000", "pad 2.00s->10.00s")

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate_hz


def validate_waveform(x: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Raise AudioError if `x` is empty, holds NaN/Inf or is all zero; return `x` unchanged."""
    x = np.asarray(x)
    if x.size == 0:
        raise _error(path, "empty", "0 samples")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(x.size - np.count_nonzero(finite))
        raise _error(path, "non-finite", f"{bad} of {x.size} samples are NaN or Inf")
    if not np.any(x):
        raise _error(path, "silent", f"all {x.size} samples are zero")
    return x


def fix_length(x: np.ndarray, num_samples: int, pad_mode: PadMode = "zero") -> np.ndarray:
    """Crop `x` (T,) from the start, or pad it to `num_samples`.

    `zero` appends silence, the paper's choice (Sec. 4.2: clips are zero-padded to 10 s); `repeat`
    loops the clip, so a stationary machine sound stays stationary (a zero-padded stretch can look like
    a sudden stop to a detector).
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples}: must be positive")
    n = x.shape[0]
    if n >= num_samples:
        return x[:num_samples]
    if n == 0:
        raise ValueError("cannot pad an empty waveform")
    if pad_mode == "repeat":
        return np.resize(x, num_samples)  # np.resize tiles the data cyclically
    return np.concatenate([x, np.zeros(num_samples - n, dtype=x.dtype)])


def resample(x: np.ndarray, source_rate_hz: int, target_rate_hz: int) -> np.ndarray:
    """Resample (T,) float32 with torchaudio's windowed-sinc resampler."""
    if source_rate_hz == target_rate_hz:
        return x
    import torch  # local: keep `import retain_asd.audio` light for numpy-only users
    import torchaudio.functional as F

    y = F.resample(torch.from_numpy(np.ascontiguousarray(x)), source_rate_hz, target_rate_hz)
    return y.numpy().astype(np.float32, copy=False)


def _check_wav_truncation(path, handle: sf.SoundFile) -> None:
    """libsndfile reads a cut-short WAV without error; its log gives the declared and actual sizes."""
    match = _WAV_DATA_SIZE_RE.search(handle.extra_info)
    if match is None:
        return
    declared, actual = int(match.group(1)), int(match.group(2))
    if declared not in _WAV_UNSET_SIZES and declared > actual:
        raise _error(path, "truncated", f"header declares {declared} data bytes, file holds {actual}")


def _decode(path, handle: sf.SoundFile, keep_frames: int | None, max_frames: int) -> tuple[np.ndarray, int]:
    """Decode block by block: the first `keep_frames` frames (all with None) as (T, C) float32, and the number of
    frames in the stream. Nothing is sized from the header, and decoding stops once the stream passes
    `max_frames`, so a small file that decodes to hours (a FLAC bomb) costs one block of memory."""
    parts, frames = [], 0
    while True:
        try:
            block = handle.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (<= block, C)
        except sf.LibsndfileError as e:  # the stream breaks after a valid header (FLAC "lost sync")
            raise _error(path, "corrupt", str(e).strip()) from None
        if block.shape[0] == 0:
            break
        if keep_frames is None or frames < keep_frames:
            parts.append(block if keep_frames is None else block[:keep_frames - frames])
        frames += block.shape[0]
        if frames > max_frames:
            raise _error(path, "too long", f"decodes to more than {max_frames / handle.samplerate:.0f} s "
                         f"(max_source_s) from {os.path.getsize(path)} bytes; decoding stopped there")
    data = np.concatenate(parts) if parts else np.zeros((0, handle.channels), np.float32)
    return data, frames


def _read_source(path, channel: ChannelPolicy, keep_frames_s: float | None = None,
                 max_source_s: float = MAX_SOURCE_S) -> tuple[np.ndarray, int, int, int, list[str]]:
    """Read the file into (T,) float32 per the channel policy; return samples, rate, channels, frames.

    The header is checked before anything is decoded (a length beyond `max_source_s`, a data chunk larger than
    the file); with `keep_frames_s` only that much of the start is kept (the rest is decoded to check it)."""
    if not os.path.exists(path):
        raise _error(path, "not found")
    if os.path.isdir(path):
        raise _error(path, "unreadable", "is a directory")
    if os.path.getsize(path) == 0:
        raise _error(path, "empty", "0 bytes")
    try:
        handle = sf.SoundFile(path)
    except sf.LibsndfileError as e:  # no header libsndfile can parse
        raise _error(path, "unreadable", str(e).strip()) from None
    with handle:
        rate_hz, channels, declared_frames = handle.samplerate, handle.channels, handle.frames
        _check_wav_truncation(path, handle)
        if rate_hz <= 0 or channels <= 0:
            raise _error(path, "unreadable", f"header gives {rate_hz} Hz, {channels} channels")
        max_frames = int(max_source_s * rate_hz)
        if declared_frames > max_frames and declared_frames < UNKNOWN_FRAMES:
            raise _error(path, "too long", f"header declares {declared_frames / rate_hz / 3600:.1f} h of audio "
                         f"({declared_frames} frames at {rate_hz} Hz) in {os.path.getsize(path)} bytes, more than "
                         f"max_source_s = {max_source_s:.0f} s")
        keep = None if keep_frames_s is None else int(round(keep_frames_s * rate_hz)) + 1
        data, frames = _decode(path, handle, keep, max_frames)
    if declared_frames == 0 or frames == 0:
        raise _error(path, "empty", "0 frames")
    if frames < declared_frames < UNKNOWN_FRAMES:
        raise _error(path, "truncated", f"header declares {declared_frames} frames, read {frames}")

    repairs = []
    if channel == "mean":
        if channels == 1:
            samples = data[:, 0]
        else:
            samples = data.mean(axis=1, dtype=np.float32)
            repairs.append("downmix")
    else:
        if not 0 <= channel < channels:
            raise _error(path, "channel", f"channel {channel} requested, file has {channels}")
        samples = data[:, channel]
        if channels > 1:
            repairs.append(f"channel {channel}")
    return np.ascontiguousarray(samples), rate_hz, channels, frames, repairs


def load_clip(
    path: str | os.PathLike,
    *,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    channel: ChannelPolicy = "mean",
    clip_s: float | None = CLIP_S,
    min_clip_s: float = 1.0,
    pad_mode: PadMode = "zero",
    max_source_s: float = MAX_SOURCE_S,
) -> AudioClip:
    """Read `path` and apply the policy: channel -> validate -> resample -> length.

    channel: "mean" averages the channels; an int picks one (DCASE 2026 is stereo near/far mic).
    clip_s: crop from the start / pad (pad_mode) to this length; None keeps the full length.
    min_clip_s: shorter sources are rejected rather than padded (mostly repeated audio is not a clip).
    max_source_s: longer sources are refused before they are decoded (a header that claims hours, a FLAC bomb);
    with clip_s only the start of the source is kept in memory.
    Validation (NaN/Inf, all zero) runs on the source samples kept, before any repair can hide it.
    """
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz={sample_rate_hz}: must be positive")
    if clip_s is not None and not clip_s > 0:
        raise ValueError(f"clip_s={clip_s}: must be positive or None")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    if isinstance(channel, bool) or not (channel == "mean" or isinstance(channel, int)):
        raise ValueError(f"channel={channel!r}: expected 'mean' or a channel index (0 = first)")
    path = os.fspath(path)
    keep_s = None if clip_s is None else clip_s + KEEP_MARGIN_S  # the resampler's window past the crop
    samples, source_rate_hz, source_channels, source_frames, repairs = _read_source(path, channel, keep_s,
                                                                                    max_source_s)
    validate_waveform(samples, path)

    source_s = source_frames / source_rate_hz
    if source_s < min_clip_s:
        raise _error(path, "too short", f"{source_s:.2f}s < min_clip_s={min_clip_s:.2f}s")

    if source_rate_hz != sample_rate_hz:
        samples = resample(samples, source_rate_hz, sample_rate_hz)
        repairs.append(f"resample {source_rate_hz}->{sample_rate_hz}")

    if clip_s is not None:
        # Decide pad/crop on the source's frame count: the resampler may add or drop one sample,
        # which fix_length absorbs without it being a repair worth recording.
        source_target_frames = int(round(clip_s * source_rate_hz))
        if source_frames < source_target_frames:
            repairs.append(f"pad {source_s:.2f}s->{clip_s:.2f}s")
        elif source_frames > source_target_frames:
            repairs.append(f"crop {source_s:.2f}s->{clip_s:.2f}s")
        samples = fix_length(samples, int(round(clip_s * sample_rate_hz)), pad_mode)

    return AudioClip(
        samples=np.ascontiguousarray(samples, dtype=np.float32),
        sample_rate_hz=sample_rate_hz,
        source_rate_hz=source_rate_hz,
        source_channels=source_channels,
        source_num_samples=source_frames,
        repairs=tuple(repairs),
    )


def channel_policy(channel: str | int) -> ChannelPolicy:
    """``data.channel`` ("mean", "0", "1") -> what `load_clip` takes ("mean" or an index)."""
    text = str(channel)
    if text != "mean" and not text.isdigit():
        raise ValueError(f"channel={channel!r}: expected 'mean' or a channel index (0 = first)")
    return "mean" if text == "mean" else int(text)


def load_clips(paths: Sequence[str | os.PathLike], clip_s: float,
               channel: ChannelPolicy = "mean") -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(B, S) float32 clips of the readable files (`load_clip`, `channel` of a multi-channel file) and
    (path, reason) for the others, so a bad file in a folder is reported, never fatal."""
    clips, bad = [], []
    for p in paths:
        try:
            clips.append(load_clip(p, clip_s=clip_s, channel=channel).samples.astype(np.float32))
        except (AudioError, OSError, RuntimeError) as err:
            bad.append((str(p), str(err)))
    return (np.stack(clips) if clips else np.zeros((0, 0), np.float32)), bad


def read_audio(
    path: str | os.PathLike,
    *,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    channel: ChannelPolicy = "mean",
    clip_s: float | None = CLIP_S,
    min_clip_s: float = 1.0,
    pad_mode: PadMode = "zero",
) -> np.ndarray:
    """`load_clip(...).samples`: (T,) float32 at `sample_rate_hz`."""
    return load_clip(
        path,
        sample_rate_hz=sample_rate_hz,
        channel=channel,
        clip_s=clip_s,
        min_clip_s=min_clip_s,
        pad_mode=pad_mode,
    ).samples


def write_audio(
    path: str | os.PathLike,
    x: np.ndarray,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    subtype: str = "PCM_16",
) -> None:
    """Write (T,) or (T, C) atomically (temp file in the same folder, then os.replace).

    PCM subtypes reject samples outside [-1, 1] instead of letting libsndfile clip them silently.
    """
    path = os.fspath(path)
    x = np.asarray(x)
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{path}: refusing to write NaN/Inf samples")
    if subtype.startswith("PCM") and x.size and float(np.max(np.abs(x))) > 1.0:
        raise ValueError(f"{path}: samples exceed [-1, 1] for subtype {subtype}; scale them or use 'FLOAT'")
    ext = os.path.splitext(path)[1]
    file_format = ext.lstrip(".").upper()  # explicit: the temp file's name must not decide it
    if file_format not in sf.available_formats():
        raise ValueError(f"{path}: unknown audio extension {ext!r}; use one of .wav, .flac, .ogg")
    with fsio.atomic_write(path, "wb") as f:
        sf.write(f, x, sample_rate_hz, subtype=subtype, format=file_format)
