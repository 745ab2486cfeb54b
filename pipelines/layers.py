"""`retain-asd layers`: the paper's Fig. 2, the layer-wise curve: every layer of each encoder scored from one
forward pass per clip (Table-2 hmean over all sets, the primary figure: eval.primary), on the evaluation corpus.

    retain-asd layers --preset smoke --checkpoint frozen --checkpoint runs/demo/pretrain/student_beats.pt --out l

Writes <out>/layers.md, <out>/score_per_layer.png and one MLflow run per encoder (`layers-<name>`, metric
layerwise/hmean_all_primary_<dn|raw> at step = layer, plus layer_<k>/hmean_all_primary_<dn|raw>).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.common import add_config_args, config_from_args, report_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="smoke")
    p.add_argument("--checkpoint", action="append", required=True, help="encoder .pt or 'frozen'; repeatable")
    p.add_argument("--out", required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from retain_asd.eval.analyses import layerwise_markdown
    from retain_asd.eval.builder import layers_from_config

    cfg = config_from_args(args, "retain-asd layers")
    if cfg is None:
        return 2
    try:
        scores, paths = layers_from_config(cfg, args.checkpoint, args.out)
    except Exception as err:  # a bad checkpoint or layer: one line (--debug for the traceback)
        return report_user_error("retain-asd layers", err)
    print(layerwise_markdown(scores, f"hmean over all sets ({cfg.eval.primary}, primary)"))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd layers"))
