"""`retain-asd pretrain`: retain-not-denoise pre-training of a BEATs student on Ray Train.

    retain-asd pretrain --preset smoke --out runs/smoke
    retain-asd pretrain --preset tagging_mixture_pm5 --out runs/tm_pm5 model.checkpoint=BEATs_iter3.pt

Writes <out>/config.yaml (resolved config), <out>/student_beats.pt (official BEATs layout), Ray Train
checkpoints under <out>/ray/, the metric history <out>/metrics.jsonl, the run summary <out>/summary.json
(steps, worker-group restarts, steps done again, resumes, final loss) and an MLflow run. A lost worker or node
restarts the group from the latest checkpoint (train.max_failures, default 3) once it can be placed again; after
train.resource_wait_s (default 600 s) without the resources the run stops (exit code 1). Running the same
command again resumes from the newest complete checkpoint. A non-finite loss or gradient norm stops the run (exit
code 1, nothing exported;
train.skip_nonfinite_steps=N skips up to N such steps). The pre-training corpus (data.*) is ingested first when
needed; the leakage guard refuses a pre-training corpus that shares a machine type, clip or noise recording with
the evaluation corpus (eval.*), unless data.add_eval_references: true (Table 5, recorded in MLflow and config.yaml).
A run owns its --out while it runs (<out>/run.lock: pid, host, start time): a second `pretrain` on the same folder
stops at once (exit code 2) naming the first; the lock of a run that died is taken over with a message. When the
checkpoint folder has no room for the next checkpoint, the run stops before writing it (exit code 1, the folder and
its free space named); the newest complete checkpoint stays the latest, and the same command resumes from it.
With data.storage=s3://bucket/prefix the checkpoints, the student and the MLflow artifacts go to the bucket
(`<prefix>/runs/<out folder name>/<preset>/`), and a re-run with the same --out name resumes from there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args, fail, protocol_guard, quiet_run
from retain_asd.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="output folder of the run (re-use it to resume)")
    p.add_argument("--stop-at-step", type=int, help="stop after this optimiser step (checkpointed; rerun to resume)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--verbose", action="store_true", help="Ray's and MLflow's own logs on the console "
                   "(default: in <out>/pretrain.log)")
    return p


def check_init_checkpoint(cfg) -> None:
    """Open model.checkpoint (when given) and check the layers the config names exist in it."""
    if not cfg.model.checkpoint:
        return
    from retain_asd.config import check_layer
    from retain_asd.models.beats import load_beats

    depth = load_beats(cfg.model.checkpoint).num_layers
    check_layer(cfg.objective.align_layer, depth, "objective.align_layer", cfg.model.checkpoint)
    check_layer(cfg.eval.layer, depth, "eval.layer", cfg.model.checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:
        parser.error("give --preset NAME or --config FILE")
    cfg = config_from_args(args, "retain-asd pretrain")
    if cfg is None:
        return 2
    from retain_asd import fsio

    try:  # first of all: a second run on the same --out stops here, before it touches anything
        with fsio.run_lock(args.out, f"retain-asd pretrain {cfg.name}") as stale:
            if stale is not None:
                print(f"retain-asd pretrain: took over {Path(args.out) / fsio.RUN_LOCK} of a run that is no longer "
                      f"running ({fsio.describe_holder(stale)})", file=sys.stderr)
            return _run(args, cfg)
    except fsio.RunLockedError as err:
        return fail("retain-asd pretrain", err)


def _run(args: argparse.Namespace, cfg) -> int:
    from retain_asd.models.beats import BEATsCheckpointError
    from retain_asd.train.checkpoint import DiskFullError
    from retain_asd.train.guard import DivergenceError
    from retain_asd.train.launch import pretrain
    from retain_asd.train.recovery import ResourceWaitError, summary_line

    try:
        check_init_checkpoint(cfg)  # a missing, torn or foreign model.checkpoint fails before Ray starts
    except (ConfigError, BEATsCheckpointError) as err:
        return fail("retain-asd pretrain: model.checkpoint", err)
    if not protocol_guard(cfg, "retain-asd pretrain"):  # before Ray starts
        return 2
    try:
        with quiet_run(Path(args.out) / "pretrain.log", args.verbose, address=args.address) as console:
            console.say(f"pretrain {cfg.name}: {cfg.objective.name}, {cfg.train.total_steps} steps, "
                        f"{cfg.train.num_workers} workers")
            result = pretrain(cfg, args.out, stop_at_step=args.stop_at_step, track=not args.no_mlflow)
    except (ConfigError, FileNotFoundError) as err:
        return fail("retain-asd pretrain", err)
    except DivergenceError as err:
        return fail(f"retain-asd pretrain: {cfg.name}", err, code=1)
    except (DiskFullError, ResourceWaitError) as err:
        return fail("retain-asd pretrain", err, code=1)
    if cfg.objective.name == "frozen":
        state = "objective 'frozen' trains nothing; exported the initial encoder"
    else:
        state = "done" if result.completed else f"stopped at step {result.step} (rerun to resume)"
    if cfg.objective.name == "frozen":  # said on the console (the library's warning went to the log)
        print(f"pretrain {cfg.name}: {state}")
    print(summary_line(result.summary) if result.summary else
          f"pretrain {cfg.name}: {state}, {result.step}/{cfg.train.total_steps} steps")
    print(f"  student (BEATs format): {result.student_path}")
    print(f"  config:                 {result.config_path}")
    print(f"  latest checkpoint:      {result.checkpoint_path}")
    if result.summary:
        print(f"  summary:                {result.out_dir / 'summary.json'}")
    if result.mlflow_run_id:
        print(f"  MLflow run:             {result.mlflow_run_id}")
    if result.mlflow_pending:
        print(f"  MLflow was unreachable at the end; once it is back: retain-asd tracking backfill --out "
              f"{result.out_dir}")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd pretrain"))
