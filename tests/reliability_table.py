"""Write docs/reliability.md: the failure cases of a multi-hour job on a shared cluster, and the tests that show
each outcome, with their result from a real pytest run.

    python tests/reliability_table.py                 # runs `pytest -m reliability`, then writes the table
    python tests/reliability_table.py --junit r.xml   # from the JUnit XML of an earlier run

A test belongs to a case through its marker, ``@pytest.mark.reliability("<case id>")`` (tests/conftest.py
records it in the JUnit XML; a test may show several cases). A case without tests is listed as not covered.
A test records what a fault cost with the ``reliability_figures`` fixture (steps lost, retries made, wall time
added, bytes lost); the figures column sums them over the case's tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (case id, the case as users met it, the outcome the tests show)
CASES = [
    ("worker-sigkill", "SIGKILL one Ray Train worker after the first checkpoint (default settings)",
     "the worker group restarts from the latest checkpoint and finishes; summary.json counts the restart"),
    ("node-lost", "a node holding a Ray Train worker lost after the first checkpoint of a 2-node STRICT_SPREAD run (a "
     "spot worker reclaimed: `cluster.remove_node`, every process of it killed); a replacement node joins",
     "the worker group restarts from the newest complete checkpoint on the nodes there are and finishes every step; "
     "summary.json counts the restart and the steps done again; the student equals an uninterrupted run's bit for "
     "bit; a group that cannot be placed within `train.resource_wait_s` (default 600 s) stops the run naming it"),
    ("resume-newest-complete", "driver killed right after a checkpoint is complete, then re-run",
     "resumes from that checkpoint; incomplete or orphaned checkpoint folders are removed"),
    ("divergence", "`train.lr=1e30`: loss NaN",
     "stops before the optimiser applies the step, with the step and the loss named; nothing exported, the "
     "last good checkpoint stays the latest"),
    ("torn-train-state", "torn `train_state.pt`",
     "error naming the file and the fix (delete that checkpoint folder)"),
    ("torn-metrics", "torn last line of `metrics.jsonl`",
     "a torn last line is dropped (the step is reported again) and cut off before the next append; a bad "
     "line inside the file is an error naming the file and the line"),
    ("torn-mlflow-pointer", "empty or torn `mlflow_run.json`", "error naming the file and the fix"),
    ("torn-labels", "torn `labels.json`, shard manifest or reference bank",
     "error naming the file and the fix (`ingest --force`, `score bank`)"),
    ("torn-cache-temp", "torn hidden temp file in the embedding cache",
     "skipped by the reader, removed when its writer is gone; a torn chunk is dropped and recomputed"),
    ("ingest-temp-leftover", "ingest killed mid-write (`.machine.tmp-*` left behind)",
     "temp files and folders of dead writers are removed at the next start; a live writer's are kept"),
    ("atomic-writes", "a writer killed mid-write",
     "the final name holds the old or the new file, never half of one (temp file + fsync + rename)"),
    ("evaluate-bad-checkpoint", "`evaluate --checkpoint good.pt --checkpoint truncated.pt`; `eval.layer` deeper "
     "than the encoder", "fails at once naming truncated.pt (or the layer and the depth); nothing evaluated"),
    ("config-validation", "`train.lr=.inf`, `objective.alpha=.inf`, `eval.batch_size=0`, `eval.layer=99`, "
     "`train.max_failures=-5`, a bad sweep value, an override that is not YAML",
     "one-line error naming the field, exit code 2, before Ray starts"),
    ("user-errors", "a user error anywhere (also inside a Ray worker)",
     "one line and exit code 2; `--debug` shows the traceback"),
    ("sweep-failures", "sweep where one trial fails / every trial fails",
     "every trial listed with its status; exit code 1; 'all N trials failed' with the first error"),
    ("cluster-exposure", "`cluster.yaml`: dashboard / job API and MLflow on 0.0.0.0 without auth",
     "dashboard on 127.0.0.1 (`ray dashboard cluster.yaml`); MLflow on the cluster interface with basic-auth "
     "and the head in `--allowed-hosts`"),
    ("file-permissions", "files written through temp files had mode 0600",
     "every output file gets the user's umask permissions (0644 under umask 022)"),
    ("ray-spill-leftover", "spilled objects and logs left under the Ray temp folder",
     "a finished local run removes its session folder; a failed one keeps only its logs and prints their size "
     "and the `rm -rf` command; sessions of killed drivers are removed at the next local start"),
    ("ray-worker-leftover", "a Ray worker (a Train controller in teardown) outlived its local cluster",
     "after `ray.shutdown()` the workers carrying the stopped raylet's pid are killed after a 2 s grace "
     "period, and before a run folder is cleaned for a resume (and at each local start) the workers of dead "
     "raylets are killed, with a warning naming them; workers of a live raylet are left alone"),
    ("two-runs-one-out", "the same `pretrain` submitted twice on one `--out`",
     "the second exits with code 2 within 5 s naming the first (pid, host, start time; `<out>/run.lock`); the "
     "first goes on unaffected; the lock of a killed run is taken over with a message"),
    ("crafted-input", "input that claims more than it holds: a WAV whose header claims 10 h in 1.6 KB, FLAC bombs "
     "(a few KB that decode to over an hour, length in the header or left unknown), a checkpoint whose deflated "
     "record inflates to 256 MiB", "refused within 2 s with < 200 MB memory growth, one line naming the file (size "
     "checks before decoding or loading; long sources decoded block by block, keeping only the clip)"),
    ("disk-full", "the checkpoint folder's file system full when a checkpoint is due (a small tmpfs, filled)",
     "every rank stops before writing it, with one line naming the folder, its free space and what the checkpoint "
     "needs (exit code 1, no retries); the previous checkpoint stays the newest complete one; the same command "
     "resumes from it once space is freed"),
    ("mlflow-down", "the `mlflow server` a run logs to killed once the first step is in it, started again only after "
     "the run ended", "the steps go on (metric logging is buffered and retried in the background, never in the "
     "step; the buffer stops with the fit, so no late batch logs a step twice); the run exits 0 naming `retain-asd "
     "tracking backfill --out RUN_DIR`, which, once the server is back, logs every step's metrics from "
     "metrics.jsonl once, the artifacts and the run's end (a server back before the end: the run back-fills "
     "itself)"),
    ("bucket-errors", "the bucket (`data.storage`, a real S3 server behind a fault-injecting proxy) answers 30% of "
     "60 requests in a row with 503 SlowDown or a connection reset, at the start of ingest, of the resumed "
     "pre-training's checkpoints and of the evaluation",
     "every stage finishes (each S3 request retried up to AWS_MAX_ATTEMPTS=10 times with backoff, in Ray's workers "
     "too); no checkpoint complete.json or corpus manifest lists a file the bucket lacks"),
    ("property", "random bytes to the audio reader, random arrays to the mixer",
     "nothing raised but AudioError / MixingError"),
]


def run_pytest(junit: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "reliability", f"--junitxml={junit}", "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


FIGURES = (("steps_lost", "steps lost {:g}"), ("retries", "retries {:g}"), ("wall_added_s", "wall time added {:.1f} s"),
           ("bytes_lost", "bytes lost {:g}"))


def figures_by_case(junit: Path) -> dict[str, dict[str, float]]:
    """{case id: {figure: sum over the case's tests}} from the ``reliability_figures`` properties."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for prop in ET.parse(junit).getroot().iter("property"):
        if prop.get("name") == "reliability_figures":
            figures = json.loads(prop.get("value"))
            case = figures.pop("case")
            for key, value in figures.items():
                out[case][key] += value
    return out


def figures_cell(figures: dict[str, float]) -> str:
    return ", ".join(fmt.format(figures[key]) for key, fmt in FIGURES if key in figures) or "–"


def results_by_case(junit: Path) -> dict[str, list[tuple[str, str]]]:
    """{case id: [(test id, passed | failed | skipped)]} from a JUnit XML file."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for case in ET.parse(junit).getroot().iter("testcase"):
        cases = [p.get("value") for p in case.iter("property") if p.get("name") == "reliability_case"]
        if not cases:
            continue
        module = case.get("classname", "").replace(".", "/")
        test = f"{module}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        for cid in dict.fromkeys(cases):
            out[cid].append((test, outcome))
    return out


def markdown(results: dict[str, list[tuple[str, str]]], when: str,
             figures: dict[str, dict[str, float]] | None = None) -> str:
    known = {cid for cid, _, _ in CASES}
    unknown = sorted(set(results) - known)
    if unknown:
        raise SystemExit(f"tests name unknown reliability cases {unknown}; add them to CASES in {__file__}")
    n = sum(len(v) for v in results.values())
    passed = sum(o == "passed" for v in results.values() for _, o in v)
    lines = [
        "# Reliability: what happens when things break",
        "",
        f"Generated by `python tests/reliability_table.py` from a pytest run ({when}): {passed} of {n} tests "
        "passed. Do not edit by hand; re-run the script.",
        "",
        "Figures, where a test measures them: optimiser steps lost (done again after the fault), retries made, wall "
        "time the fault added, bytes of results lost (must be 0).",
        "",
        "| case | outcome | status | figures | tests |",
        "|---|---|---|---|---|",
    ]
    for cid, case, outcome in CASES:
        tests = results.get(cid, [])
        if not tests:
            status = "not covered yet"
        elif all(o == "passed" for _, o in tests):
            status = f"shown ({len(tests)} passed)"
        else:
            bad = sum(o != "passed" for _, o in tests)
            status = f"**{bad} of {len(tests)} not passing**"
        cell = "<br>".join(f"`{t}`" + ("" if o == "passed" else f" ({o})") for t, o in sorted(tests)) or "–"
        cell = cell.replace("|", "\\|")  # a parametrised test id must not split the table row
        lines.append(f"| {case} | {outcome} | {status} | {figures_cell((figures or {}).get(cid, {}))} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--junit", type=Path, help="JUnit XML of an earlier `pytest -m reliability` run")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit = args.junit
        if junit is None:
            junit = Path(tmp) / "reliability.xml"
            run_pytest(junit)
        when = datetime.datetime.fromtimestamp(junit.stat().st_mtime, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        text = markdown(results_by_case(junit), when, figures_by_case(junit))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
