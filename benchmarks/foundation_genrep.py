"""Quality check: GenRep kNN official score of the stand-in foundation encoder vs the same BEATs at random init.

    python benchmarks/foundation_genrep.py --work /tmp/fgr [--out result.json] [--layers 2 4] [KEY=VALUE ...]

KEY=VALUE are `foundation.*` overrides (e.g. steps=100 objective=masked). The evaluation world is the
synthetic machine corpus (fan, pump, gearbox: no generic sound family is one of them), 2 s clips, mixed with
Factory A (stationary) / Factory B (non-stationary) noise at 0 dB and at +100 dB ("clean"). The baseline is
the randomly initialised encoder of the same cfg, scored in the same run, with the same sets and kNN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import yaml

from retain_asd.config import FoundationConfig
from retain_asd.corpus.ingest import ingest
from retain_asd.corpus.shards import DecodeSettings
from retain_asd.corpus.synth import write_synthetic_corpus
from retain_asd.eval.evalsets import EvalSetParams, build_evalsets
from retain_asd.eval.run import evaluate_checkpoint
from retain_asd.models.beats import write_random_checkpoint
from retain_asd.runtime import init_ray
from retain_asd.train.foundation import foundation_beats_config, foundation_encoder

CONDITIONS = ("factory_a", "factory_b")
SNRS_DB = (0.0, 100.0)  # 100 dB = clean for every practical purpose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for corpus, sets and encoders")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default <work>/foundation_genrep.json)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="1-based layers (default: middle, last)")
    parser.add_argument("overrides", nargs="*", help="foundation KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    settings = FoundationConfig(**overrides)
    layers = args.layers or sorted({max(1, settings.encoder_layers // 2), settings.encoder_layers})

    start = time.perf_counter()
    trained = foundation_encoder(settings, args.work / "foundation", progress=True)
    train_s = time.perf_counter() - start
    random = write_random_checkpoint(args.work / "random.pt", foundation_beats_config(settings), seed=settings.seed)

    init_ray(num_cpus=2, quiet=True)
    synth = write_synthetic_corpus(args.work / "synth", machines=("fan", "pump", "gearbox"), train_source_per_attr=4,
                                   train_target_per_attr=3, test_per_domain=12, clip_s=2.0,
                                   noise_clips_per_category=3, noise_clip_s=40.0)
    ingest(synth.machine_root, synth.noise_root, args.work / "corpus", settings=DecodeSettings(clip_s=2.0))
    sets = build_evalsets(args.work / "corpus", args.work / "evalsets",
                          EvalSetParams(snrs_db=SNRS_DB, source_refs=24, target_refs=6, test_normal=12,
                                        test_anomaly=12))
    result = {"settings": dataclasses.asdict(settings), "train_s": train_s, "layers": layers, "cells": []}
    for name, path in (("random_init", random), ("foundation", trained)):
        res = evaluate_checkpoint(path, sets, layers, conditions=CONDITIONS, name=name, batch_size=16)
        for c in res.cells:
            result["cells"].append({"encoder": name, "condition": c.condition, "snr_db": c.snr_db, "layer": c.layer,
                                    "domain_norm": c.domain_norm, "official": c.official})
    out = args.out or args.work / "foundation_genrep.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for layer in layers:
        for dn in (False, True):
            print(f"layer {layer} {'DN ' if dn else 'raw'}", end="")
            for cond in CONDITIONS:
                for snr in SNRS_DB:
                    vals = {c["encoder"]: c["official"] for c in result["cells"]
                            if (c["layer"], c["domain_norm"], c["condition"], c["snr_db"]) == (layer, dn, cond, snr)}
                    label = "clean" if snr >= 100 else f"{snr:+.0f}dB"
                    print(f" | {cond} {label}: {vals['random_init']:.3f} -> {vals['foundation']:.3f}", end="")
            print()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
