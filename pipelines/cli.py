"""`retain-asd`: one console script, a thin dispatcher to the job entry points in pipelines/.

Each subcommand lives in its own module with ``build_parser()`` and ``main(argv) -> int``; the same module
is what ``ray job submit -- python -m pipelines.<name>`` runs on a cluster.
"""

from __future__ import annotations

import importlib
import sys

from pipelines.common import run_main
from retain_asd.runtime import apply_env_defaults

COMMANDS = {
    "config": ("pipelines.config_cmd", "show or list configs and presets"),
    "synth": ("pipelines.synth", "write the synthetic machine + noise corpus (the embedded default)"),
    "ingest": ("pipelines.ingest", "raw corpus folders -> Parquet shards, manifest, rejects, labels"),
    "foundation": ("pipelines.foundation", "train (once) the stand-in foundation encoder on generic clean sounds"),
    "inspect-stream": ("pipelines.inspect_stream", "the training stream per batch: classes, noises, SNRs"),
    "pretrain": ("pipelines.pretrain", "retain-not-denoise pre-training on Ray Train"),
    "evalsets": ("pipelines.evalsets", "build the Factory A / B / Mismatch evaluation sets"),
    "evaluate": ("pipelines.evaluate", "score checkpoints on the evaluation sets, log to MLflow"),
    "score": ("pipelines.score", "save a reference bank and score new clips (a deployable detector)"),
    "dcase-score": ("pipelines.dcase_score", "score evaluator-format CSVs against ground truth"),
    "table3": ("pipelines.table3", "Table 3, the testbed check: wave mixture vs. embedding-mixture oracle, no DN"),
    "layers": ("pipelines.layers", "Fig. 2: every layer of each encoder scored from one forward pass"),
    "tracking": ("pipelines.tracking_cmd", "backfill: log what a pre-training run could not while MLflow was down"),
    "compare": ("pipelines.compare", "Table 2 across the runs of an MLflow experiment (mean and 95% CI over seeds)"),
    "sweep": ("pipelines.sweep", "Ray Tune search over SNR ranges and alpha/beta"),
    "study": ("pipelines.study", "the Table-2 rows over several seeds: mean and 95% interval per cell"),
    "demo": ("pipelines.demo", "the study's short form: foundation encoder, frozen / denoise / tagging_mixture, table"),
}


def usage() -> str:
    lines = ["usage: retain-asd COMMAND [options] [--debug]   (retain-asd COMMAND --help for its options)", "",
             "--debug: show the traceback of an error (user errors are one line otherwise)", "", "commands:"]
    lines += [f"  {name:<12} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = ["--debug"] if "--debug" in argv else []  # accepted before or after the command
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"retain-asd: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    apply_env_defaults()
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(module.main, [*rest, *debug], prog=f"retain-asd {name}")


if __name__ == "__main__":
    sys.exit(main())
