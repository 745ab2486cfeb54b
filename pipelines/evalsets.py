"""`retain-asd evalsets`: build the Factory A / B / Mismatch evaluation sets (recipes + manifest).

Reads only the evaluation corpus (eval.machine_root / eval.noise_root, or the synthetic evaluation world),
ingested under `<data.work_dir>/corpus_eval`, and writes `<data.work_dir>/evalsets/` (both under `<data.storage>/`
instead when data.storage names an object store). Counts, SNRs and the seed come from the `eval` section of the
config. Re-running on an unchanged corpus is a no-op. The leakage guard first checks that it shares nothing
with the pre-training corpus (data.*).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipelines.common import add_config_args, fail, protocol_guard
from retain_asd.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd evalsets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even when the corpus and settings are unchanged")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from retain_asd.eval.evalsets import EvalSetError, evalsets_from_config

    try:
        cfg = load_config(args.preset, args.config, args.overrides)  # errors reported below with the others
        if not protocol_guard(cfg, "retain-asd evalsets"):
            return 2
        sets = evalsets_from_config(cfg, force=args.force)
    except (ConfigError, EvalSetError, FileNotFoundError) as err:
        return fail("retain-asd evalsets", err)
    m = sets.manifest
    print(f"evaluation sets {sets.root}: {m['rows']} recipe rows, SNRs {sets.snrs_db} dB")
    print(json.dumps({"counts": m["counts"], "per_machine": m["per_machine"]}, indent=1))
    for w in m["warnings"]:
        print(f"warning: {w}")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd evalsets"))
