"""`retain-asd inspect-stream`: what the training stream feeds the loop, batch by batch.

    retain-asd inspect-stream --preset smoke --batches 40
    retain-asd inspect-stream --preset smoke --batches 40 --json > stream.json

Builds the real training stream of the config (same corpus, seed, SNR sampler and class weighting as
`retain-asd pretrain`, ingesting the corpus first when needed) and draws `--batches` batches of
`--batch-size` rows as one consumer. Reports per batch the machine classes, noise classes and SNRs
drawn; in summary the mean number of distinct machine classes per batch against the iid expectation
C (1 - (1 - 1/C)^b) (a well-mixed batch is close to it; a batch of one shard's rows has ~1), the SNR
histogram, noise usage and clips/s. In a real run each of train.num_workers workers gets every
num_workers-th block of this same stream.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np

from pipelines.common import add_config_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd inspect-stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--batches", type=int, default=20, help="batches to draw (default 20)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows per batch (default 16; a run's micro-batch is train.batch_size / train.num_workers)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    return p


def inspect(cfg, num_batches: int, batch_size: int) -> dict:
    """Draw `num_batches` batches of the config's training stream; the per-batch draws and the summary."""
    from retain_asd import stream
    from retain_asd.corpus.ingest import corpus_from_config
    from retain_asd.train.launch import train_stream_from

    corpus = corpus_from_config(cfg.data)
    plan = train_stream_from(cfg, corpus, num_clips=num_batches * batch_size + batch_size)
    vocab = corpus.vocab
    machine, noise, snr = [], [], []
    columns = ("machine_idx", "noise_idx", "snr_db")
    t0, first = time.perf_counter(), None
    for batch in stream.iter_train_batches(plan.dataset.iterator(), batch_size, cfg.train.seed, columns=columns,
                                           noise_bank=plan.state_ref, device="cpu"):
        if first is None:
            first = time.perf_counter()  # clips/s after the first batch (stream start-up excluded)
        machine.append(batch["machine_idx"].tolist())
        noise.append(batch["noise_idx"].tolist())
        snr.append([round(float(s), 2) for s in batch["snr_db"]])
        if len(machine) == num_batches:
            break
    end = time.perf_counter()
    if len(machine) < num_batches:
        raise ValueError(f"the stream gave {len(machine)} batches of {batch_size}, asked for {num_batches}")
    num_machine = vocab.num_machine
    distinct = [len(set(b)) for b in machine]
    iid = stream.iid_distinct_expectation(num_machine, batch_size)
    counts, edges = np.histogram(np.concatenate(snr), bins=10)
    noise_names = {vocab.index(c): c for c in vocab.noise_classes}
    later = (num_batches - 1) * batch_size
    return {
        "preset": cfg.name, "machine_classes": num_machine, "batch_size": batch_size,
        "num_batches": num_batches, "batches": machine,
        "noise_batches": [[noise_names[j] for j in b] for b in noise], "snr_db": snr,
        "distinct_machine_classes": distinct,
        "mean_distinct_machine_classes": float(np.mean(distinct)), "iid_expectation": iid,
        "ratio_to_iid": float(np.mean(distinct)) / iid,
        "machine_class_names": list(vocab.machine_classes),
        "machine_usage": {vocab.machine_classes[k]: v for k, v in sorted(Counter(sum(machine, [])).items())},
        "noise_usage": dict(sorted(Counter(noise_names[j] for b in noise for j in b).items())),
        "snr_histogram": {"edges_db": [round(float(e), 3) for e in edges], "counts": counts.tolist()},
        "clips_per_s": later / (end - first) if later and end > first else None,
        "seconds_to_first_batch": first - t0,
    }


def report(r: dict) -> str:
    lines = [f"training stream of {r['preset']}: {r['num_batches']} batches of {r['batch_size']}, "
             f"{r['machine_classes']} machine classes", ""]
    for i, (m, n, s) in enumerate(zip(r["batches"], r["noise_batches"], r["snr_db"], strict=True)):
        lines.append(f"batch {i:3d}: {len(set(m)):2d} machine classes {m}")
        lines.append(f"           noise {n}")
        lines.append(f"           snr_db {s}")
    lines += ["", f"distinct machine classes per batch: mean {r['mean_distinct_machine_classes']:.2f}, "
              f"iid expectation {r['iid_expectation']:.2f} (ratio {r['ratio_to_iid']:.2f})",
              "SNR histogram (dB):"]
    e, c = r["snr_histogram"]["edges_db"], r["snr_histogram"]["counts"]
    lines += [f"  [{e[k]:7.2f}, {e[k + 1]:7.2f}) {c[k]:5d}" for k in range(len(c))]
    lines.append("noise usage: " + ", ".join(f"{k} {v}" for k, v in r["noise_usage"].items()))
    if r["clips_per_s"] is not None:
        lines.append(f"clips/s after the first batch: {r['clips_per_s']:.1f} "
                     f"(first batch after {r['seconds_to_first_batch']:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:
        parser.error("give --preset NAME or --config FILE")
    if args.batches < 1 or args.batch_size < 1:
        parser.error(f"--batches {args.batches} and --batch-size {args.batch_size} must be >= 1")
    cfg = config_from_args(args, "retain-asd inspect-stream")
    if cfg is None:
        return 2
    from retain_asd.runtime import init_ray, set_data_progress

    init_ray(args.address, quiet=True)
    set_data_progress(False)
    result = inspect(cfg, args.batches, args.batch_size)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd inspect-stream"))
