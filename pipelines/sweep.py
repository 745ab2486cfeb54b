"""`retain-asd sweep`: Ray Tune over SNR ranges and alpha/beta (config section `tune`), each trial a full
pretrain + evaluate.

    retain-asd sweep --preset tagging_mixture_pm5 --out runs/sweep model.checkpoint=BEATs_iter3.pt
    retain-asd compare --experiment retain-asd-sweep

tune.search=grid (default) runs every (SNR range, alpha, beta) once; random / optuna draw tune.num_samples
points; tune.max_concurrent trials run at once. Every trial is an MLflow run in `<experiment>-sweep` with
its pre-training and evaluation runs nested under it. Trials validate during pre-training (train.validate_every;
when 0, a sweep validates every total_steps / 10 steps); tune.scheduler=asha stops weak trials early on
val/hmean_low. The best finished trial by val/hmean_low is written as a preset file, <out>/best.yaml (use it with
--config), and its student is registered in the MLflow Model Registry as a version of
retain-asd-<tracking.experiment> with the alias @best (evaluate and score take models:/ URIs); the summary shows
each trial's validation figure and its test figure (tune.metric) side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args, protocol_guard, quiet_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's, Tune's and MLflow's own logs on the console "
                   "(default: in <out>/sweep.log)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:  # a bare sweep would start hours of base-BEATs trials
        parser.error("give --preset NAME or --config FILE (the base config every trial starts from)")
    cfg = config_from_args(args, "retain-asd sweep")
    if cfg is None:
        return 2

    from retain_asd.experiments.registry import register_best_student
    from tune.space import check_trials
    from tune.sweep import best_trial, run_sweep, summarize_sweep, sweep_experiment, sweep_plan, write_best_config

    check_trials(cfg)  # a bad sweep value fails here, before Ray starts
    if not protocol_guard(cfg, "retain-asd sweep"):  # so does an overlap of the two corpora
        return 2
    with quiet_run(Path(args.out) / "sweep.log", args.verbose, address=args.address) as console:
        console.say(sweep_plan(cfg))
        grid = run_sweep(cfg, args.out, say=console.say)
        text, code = summarize_sweep(grid, cfg.tune.metric)
        best = write_best_config(grid, cfg, Path(args.out) / "best.yaml")
        student = register_best_student(cfg, best_trial(grid), args.out)  # models:/...@best
    console.say(text)
    if best:
        console.say(f"best trial's config: {best} (retain-asd pretrain --config {best} --out DIR)")
    if student:
        console.say(f"best trial's student: {student.uri} (alias @best; retain-asd evaluate --config {best} "
                    f"--checkpoint {student.uri} --out DIR)")
    console.say(f"compare the trials: retain-asd compare --experiment {sweep_experiment(cfg)} "
                f"data.work_dir={cfg.data.work_dir}")
    return code


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd sweep"))
