"""`retain-asd ingest`: raw corpus folders -> Parquet shards + manifest + rejects + labels.json.

Both corpora of the paper's protocol (Sec. 4.1), each into its own folder under the work folder: the
pre-training corpus (--machine-root/--noise-root, data.*) into `corpus_pretrain/` and the evaluation corpus
(--eval-machine-root/--eval-noise-root, eval.*) into `corpus_eval/`. An empty root means the synthetic
pre-training / evaluation world (the embedded default); a real pre-training corpus without an evaluation corpus
is ingested alone (evaluate then needs eval.machine_root/eval.noise_root, or eval.synthetic=true). What the
two share is reported (pretrain, evaluate, evalsets and sweep refuse it). Re-running on unchanged input is a
no-op; a changed file rebuilds the shards.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from pipelines.common import add_config_args, config_from_args, fail, quiet_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine-root", help="DCASE 2020-2025 / MIMII DG / ToyADMOS2 folder (default: synthetic)")
    p.add_argument("--noise-root", help="noise folder <root>/<category>/*.wav + categories.yaml")
    p.add_argument("--eval-machine-root", help="evaluation corpus: machine folder (default: eval.machine_root, "
                                               "else the synthetic evaluation world)")
    p.add_argument("--eval-noise-root", help="evaluation corpus: noise folder (categories.yaml: stationary -> "
                                             "Factory A, else Factory B)")
    p.add_argument("--out", help="work folder (default: data.work_dir of the config); with data.storage set the "
                                 "shards go to <data.storage>/corpus_* and this folder keeps only scratch")
    add_config_args(p)
    p.add_argument("--rows-per-shard", type=int, help="Parquet rows per shard file")
    p.add_argument("--force", action="store_true", help="rebuild even when the input is unchanged")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's own logs on the console (default: <out>/ingest.log)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from retain_asd.config import ConfigError
    from retain_asd.corpus.ingest import eval_corpus_from_config, missing_evaluation_corpus, pretrain_corpus_from_config
    from retain_asd.corpus.layouts import check_machine_root
    from retain_asd.corpus.names import LayoutError
    from retain_asd.corpus.protocol import find_overlaps

    cfg = config_from_args(args, "retain-asd ingest")
    if cfg is None:
        return 2
    data = replace(cfg.data, machine_root=args.machine_root or cfg.data.machine_root,
                   noise_root=args.noise_root or cfg.data.noise_root, work_dir=args.out or cfg.data.work_dir,
                   rows_per_shard=args.rows_per_shard or cfg.data.rows_per_shard)
    ev = replace(cfg.eval, machine_root=args.eval_machine_root or cfg.eval.machine_root,
                 noise_root=args.eval_noise_root or cfg.eval.noise_root)
    cfg = replace(cfg, data=data, eval=ev)
    try:  # the roots first: a wrong folder is said before anything is synthesised or ingested
        for root in (data.machine_root, ev.machine_root):
            if root:
                check_machine_root(root)
    except LayoutError as err:
        return fail("retain-asd ingest", err)
    try:
        with quiet_run(Path(data.work_dir) / "ingest.log", args.verbose, address=args.address) as console:
            pre = pretrain_corpus_from_config(cfg, force=args.force)
            console.say("pre-training corpus:\n" + pre.summary())
            skipped = missing_evaluation_corpus(cfg)
            if skipped:  # a real corpus alone: no synthetic evaluation world is written behind the user's back
                console.say(f"evaluation corpus: not ingested. {skipped}")
                return 0
            evc = eval_corpus_from_config(cfg, force=args.force)
            console.say("evaluation corpus:\n" + evc.summary())
            console.say(f"protocol: {find_overlaps(pre, evc).describe()}")
    except (LayoutError, FileExistsError, ConfigError) as err:
        return fail("retain-asd ingest", err)
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd ingest"))
