"""`retain-asd study --preset synthetic_table2`: the Table-2 rows over several seeds, one MLflow experiment.

Every row (config section `study.rows`) continues the same initial encoder (model.checkpoint, or the cached
stand-in foundation encoder) at every seed of `study.seeds`, and is scored on the evaluation world at the
config's SNRs and conditions. Prints hmean{-10,-5,0} and All per row, raw and DN, with the mean and a 95%
interval over the training seeds and a bootstrap of the test clips, and each row against `study.base` (default
`denoise`; better / worse only when the difference's interval excludes 0); <out>/summary/comparison.md has
every condition x SNR. A re-run skips the finished row x seed pairs (`study.base=frozen`: the same cells against
`frozen`). Ray's and MLflow's logs go to <out>/study.log (--verbose: on the console).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="study folder (default: runs/study-<preset or config name>)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's and MLflow's own logs on the console")
    add_config_args(p, default_preset="synthetic_table2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, "retain-asd study")
    if cfg is None:
        return 2
    from retain_asd.experiments.study import check_study

    check_study(cfg)  # a bad row or seed list fails before Ray starts
    out = Path(args.out or f"runs/study-{cfg.name}").resolve()
    return run_and_print(cfg, out, address=args.address, verbose=args.verbose, log_name="study.log")


def run_and_print(cfg, out: Path, *, address: str | None, verbose: bool, log_name: str, header: str = "") -> int:
    """Shared by `study` and `demo`: run the study quietly, print one line per stage and the table."""
    from pipelines.common import quiet_run
    from retain_asd.config import uses_foundation
    from retain_asd.experiments.study import run_study, study_metric
    from retain_asd.runtime import isatty
    from retain_asd.tracking import runs_page
    from retain_asd.train.foundation import foundation_path
    from retain_asd.train.launch import foundation_cache_dir, initial_encoder

    with quiet_run(out / log_name, verbose, address=address) as console:
        if header:
            console.say(header)
        if uses_foundation(cfg) and not foundation_path(cfg.foundation, foundation_cache_dir(cfg)).is_file():
            console.say(f"stand-in foundation encoder: training {cfg.foundation.steps} steps on generic clean "
                        "sounds (once; cached for every later run)")
            with contextlib.redirect_stderr(console.stream):  # its progress bar on the console
                initial_encoder(cfg, progress=None if verbose else isatty(console.stream))
        result = run_study(cfg, out, say=console.say, progress=False)
    console.say("")
    console.say(f"Table 2 ({result.comparison.primary} primary; official score x100, mean ± "
                f"{result.headline.header()}; hmean{{-10,-5,0}} and All over {', '.join(cfg.eval.conditions)}):")
    console.say(f"resolution: {result.headline.resolution(study_metric(cfg))}")
    for line in result.comparison.scored_on:  # what every score of the table was computed on
        console.say(line)
    console.say(result.table)
    console.say(f"every condition x SNR: {result.table_path} (CSV and plots beside it)")
    console.say(f"MLflow: {result.tracking_uri}, experiment '{result.experiment}'")
    console.say(f"  open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    console.say(f"  the runs table: {runs_page(result.tracking_uri, result.experiment)}")
    console.say(f"  the same table: retain-asd compare --experiment {result.experiment} --metric "
                f"{study_metric(cfg)} --tracking-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd study"))
