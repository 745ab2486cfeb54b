"""`retain-asd layers`: the paper's Fig. 2, the layer-wise curve: every layer of each encoder scored from one
forward pass per clip (Table-2 hmean over all sets, the primary figure: eval.primary), on the evaluation corpus,
or with --dcase-root on a DCASE 2020-2026 tree (the official score of its year, per layer; channel data.channel).

    retain-asd layers --preset demo data.work_dir=runs/demo/data --checkpoint frozen \
        --checkpoint runs/demo/rows/tagging_mixture/seed0/pretrain/student_beats.pt --out runs/demo/layers
    retain-asd layers --checkpoint frozen --checkpoint student.pt --out fig2_2023
        --dcase-root dcase2023t2/eval_data --ground-truth dcase2023_task2_evaluator/ground_truth   (one line)

(the first after `retain-asd demo`: its evaluation world, its initial encoder as 'frozen', its tagging_mixture
student)

Writes <out>/layers.md (with --dcase-root also a machine x layer table per encoder; * marks the layer `evaluate`
reports), <out>/score_per_layer.png (one curve per encoder) and one MLflow run per encoder (`layers-<name>`,
metric layerwise/hmean_all_primary_<dn|raw>, or layerwise/dcase_official_<dn|raw>, at step = layer).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import add_config_args, run_analysis


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="smoke")
    p.add_argument("--checkpoint", action="append", required=True, help="encoder .pt or 'frozen'; repeatable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dcase-root", help="a DCASE 2020-2026 folder instead of the eval sets (docs/dcase.md)")
    p.add_argument("--ground-truth", help="evaluator ground-truth folder for DCASE eval data (with --dcase-root)")
    return p


def build(cfg, checkpoints, args):
    from retain_asd.eval.builder import layers_from_config

    _, paths = layers_from_config(cfg, checkpoints, args.out, dcase_root=args.dcase_root,
                                  ground_truth_dir=args.ground_truth)
    return paths[0].read_text(), paths


def main(argv: list[str] | None = None) -> int:
    return run_analysis("retain-asd layers", build_parser(), argv, build)


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd layers"))
