"""Batched Kaldi fbank (`models.fbank.kaldi_fbank`) against torchaudio's `kaldi.fbank` called clip by clip.

    python benchmarks/fbank.py [--batch 32] [--clip-s 10] [--repeats 7] [--out benchmarks/results/fbank.json]

Baseline: what BEATs' official `preprocess` does (and this code did before): one `kaldi.fbank` call per
clip in a Python loop, stacked (`kaldi_fbank_per_clip`). Both run in this process on the CPU on the same
batch of random 10 s clips, after one untimed call each, interleaved per repeat (order alternating) so
machine load hits both alike. `ratio` = median per-clip-loop seconds / median batched seconds. The
largest difference between the two outputs is reported as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from retain_asd.models.beats import WAVEFORM_SCALE
from retain_asd.models.fbank import kaldi_fbank, kaldi_fbank_per_clip

SAMPLE_RATE_HZ = 16000


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clip-s", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fbank.json")
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    clips = 0.1 * torch.randn(args.batch, int(args.clip_s * SAMPLE_RATE_HZ), generator=g) * WAVEFORM_SCALE
    sides = {"batched": lambda: kaldi_fbank(clips), "per_clip_loop": lambda: kaldi_fbank_per_clip(clips)}
    load_before = os.getloadavg()
    max_abs_diff = (sides["batched"]() - sides["per_clip_loop"]()).abs().max().item()  # also the warm-up
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name in sides if repeat % 2 == 0 else reversed(sides):
            start = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {
        "benchmark": "fbank: batched kaldi_fbank vs per-clip torchaudio kaldi.fbank loop",
        "ratio": median["per_clip_loop"] / median["batched"],
        "batch": args.batch, "clip_s": args.clip_s, "repeats": args.repeats, "device": "cpu",
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "commit": _commit(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "max_abs_diff_log_mel": max_abs_diff,
        **{f"{name}_median_s": m for name, m in median.items()},
        **{f"{name}_clips_per_s": args.batch / m for name, m in median.items()},
        "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fbank {args.batch} x {args.clip_s:g} s: batched {median['batched'] * 1e3:.1f} ms, per-clip loop "
          f"{median['per_clip_loop'] * 1e3:.1f} ms, ratio {result['ratio']:.2f} (load {load_before[0]:.1f}) "
          f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
