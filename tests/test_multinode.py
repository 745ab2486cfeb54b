"""Scale-out on a simulated 2-node Ray cluster (`ray.cluster_utils.Cluster`): two raylets with their own object
stores on this machine, one DDP worker per node (STRICT_SPREAD).

The cluster runs in a child process (``python tests/test_multinode.py WORK``): the session's embedded Ray
(`ray_local`) stays untouched, and the child's nodes are torn down with it. On the cluster: ingest, the
stream's state shipped to the other node, a smoke pre-training during which node_b is lost once the first
checkpoint is complete (its processes killed, a spot worker reclaimed) and a replacement node_c joins (the
autoscaler's part), a pre-training whose group can never be placed (train.resource_wait_s), an evaluation and a
1-trial sweep. The child writes what it saw to WORK/result.json; the test compares it with an uninterrupted
single-node run of the same config in the session's Ray. (Stop-and-resume: tests/train/test_launch.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
NODE_OBJECT_STORE_BYTES = 256 * 1024**2
# 2 logical CPUs per node: a worker (0.5 CPU) plus a Ray Data read task (1 CPU) must fit on each node.
NODE_CPUS = 2


# The smoke preset on the smallest worlds that still cross the nodes: 1 s clips, one machine type per world, the
# evaluation on one condition (factory_a mixes noise) at one SNR. Same settings on 2 nodes and on 1.
SMALL = ["data.clip_s=1.0", "data.synth_machines=[fan]", "eval.synth_machines=[bearing]",
         "eval.synth_noise=[hvac, hammering]", "eval.conditions=[factory_a]", "eval.snrs_db=[0.0]"]


# The node-loss run: a checkpoint every 2 steps (the first is where the node is lost), every step reported (the
# wall time the loss added is timed between two reports of the same step).
NODE_LOSS = ["train.checkpoint_every=2", "train.log_every=1"]


def smoke_config(work: Path, *more: str):
    from retain_asd.config import load_config

    return load_config("smoke", overrides=[f"data.work_dir={work / 'data'}", *SMALL,
                                           f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", *more])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(label: str, **more) -> dict:
    """One simulated node: its own ports (other Ray clusters may hold the defaults on this machine)."""
    return {"num_cpus": NODE_CPUS, "resources": {label: 1}, "object_store_memory": NODE_OBJECT_STORE_BYTES,
            "node_ip_address": "127.0.0.1", "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port(), **more}


def start_two_nodes():
    """Head "node_a" (driver attached) + worker "node_b"; returns (cluster, {label: node id})."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=node_args(
        "node_a", include_dashboard=False, gcs_server_port=free_port(), dashboard_agent_listen_port=free_port()))
    cluster.add_node(**node_args("node_b"))
    cluster.wait_for_nodes()
    cluster.connect()
    ids = {label: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and label in n["Resources"])
           for label in ("node_a", "node_b")}
    return cluster, ids


def node_id(label: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and label in n["Resources"])


# ------------------------------------------------------------------------------------------ child process
class Background(threading.Thread):
    """`fn()` off the main thread (its result or error kept): Ray starts a node only from the main thread."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:
            self.error = err


def lose_node_b_while(cluster, run: Background, out: Path, run_dir: Path) -> dict:
    """The fault, beside a running pre-training: once its first checkpoint is complete, node_b is lost (every
    process of it SIGKILLed) and a replacement node_c joins. Records the first checkpoint's digests and, for the
    wall time the loss added, when each report arrived (metrics.jsonl, every step)."""
    from retain_asd.train.checkpoint import complete_checkpoints, read_digests

    seen: dict = {"reports": []}  # [(step, seconds since start, after the loss?, resumed_from_step)]
    t0, lines, lost = time.perf_counter(), 0, False
    while run.is_alive():
        path = out / "metrics.jsonl"
        rows = path.read_text().splitlines() if path.is_file() else []
        for row in rows[lines:]:  # whole lines only: a torn last one is read again next time
            if not row.endswith("}"):
                break
            row, lines = json.loads(row), lines + 1
            seen["reports"].append((row["step"], time.perf_counter() - t0, lost, row.get("resumed_from_step")))
        complete = [] if lost else complete_checkpoints(run_dir)[0]
        if complete:
            step, folder = complete[0]
            seen["first"] = {"step": step, "digests": read_digests(folder)}
            (node_b,) = cluster.worker_nodes
            cluster.remove_node(node_b, allow_graceful=False)
            lost = True
            cluster.add_node(**node_args("node_c"))  # the autoscaler's part
            seen["node_c"] = node_id("node_c")
        time.sleep(0.05)
    return seen


def lose_a_node_mid_run(cluster, cfg, out: Path, corpus) -> dict:
    """Pre-train on node_a + node_b, lose node_b after the first checkpoint, finish on node_a + node_c."""
    from retain_asd.train.checkpoint import COMPLETE, complete_step, read_digests
    from retain_asd.train.launch import pretrain

    run = Background(lambda: pretrain(cfg, out, corpus=corpus))
    run.start()
    seen = lose_node_b_while(cluster, run, out, out / "ray" / cfg.name)
    run.join()
    if run.error is not None:
        raise run.error
    result = run.result
    markers = sorted((out / "ray" / cfg.name).glob(f"checkpoint_*/{COMPLETE}"))
    return {**seen, "step": result.step, "summary": result.summary,
            "digests": read_digests(result.checkpoint_path), "student_path": str(result.student_path),
            "markers_verified": [complete_step(m.parent) is not None for m in markers]}


def never_placed(work: Path, corpus) -> dict:
    """A worker group that no node can hold (3 CPUs a worker, 2 a node): the run stops after train.resource_wait_s."""
    from retain_asd.train.launch import pretrain
    from retain_asd.train.recovery import ResourceWaitError, read_events

    cfg = smoke_config(work, "train.cpus_per_worker=3", "train.resource_wait_s=2")
    try:
        pretrain(cfg, work / "unplaceable", corpus=corpus, track=False)
    except ResourceWaitError as err:
        return {"error": str(err), "events": [e["event"] for e in read_events(work / "unplaceable")],
                "checkpoints": sorted(p.name for p in (work / "unplaceable").glob("ray/*/checkpoint_*"))}
    return {"error": None}


def noise_bank_on_other_node(corpus, node_b: str) -> dict:
    """Build the stream on the driver (node_a), hide the noise shards from the disk, mix on node_b."""
    import ray

    from retain_asd import stream

    plan = stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                     snr_sampler={"kind": "fixed", "snr_db": 0.0}, seed=0, num_epochs=1)
    noise_dir = corpus.root / "noise"
    hidden = noise_dir.rename(noise_dir.with_name("noise.hidden"))  # no noise shard on disk for any node
    try:
        @ray.remote(num_cpus=0, resources={"node_b": 0.01})
        def mix_first_unit(refs: list) -> dict:
            state = ray.get(refs[0])  # wrapped in a list: resolved here, through node_b's object store
            rows = [r for block in stream.mix_unit(state, 0, 0) for r in block["noise_id"]]
            return {"node_id": ray.get_runtime_context().get_node_id(), "rows": len(rows),
                    "noise_ids": sorted(set(map(str, rows))), "noise_dir_exists": noise_dir.exists()}

        remote = ray.get(mix_first_unit.remote([plan.state_ref]))
        ds_rows = sum(len(b["noise_id"]) for b in plan.dataset.iter_batches(batch_size=None))
        locations = ray.experimental.get_object_locations([plan.state_ref])[plan.state_ref]
    finally:
        hidden.rename(noise_dir)
    return {**remote, "dataset_rows": ds_rows, "planned_rows": plan.num_rows,
            "state_locations": sorted(locations["node_ids"]), "state_bytes": locations["object_size"],
            "bank_noise_ids": sorted(map(str, plan.state.bank.noise_ids))}


def run_on_cluster(work: Path) -> dict:
    from retain_asd.corpus.ingest import corpus_from_config
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.experiments import resolve_checkpoints
    from retain_asd.runtime import set_data_progress
    from retain_asd.train.checkpoint import read_digests
    from retain_asd.train.launch import latest_checkpoint
    from tune.sweep import run_sweep

    t0 = time.perf_counter()
    cluster, nodes = start_two_nodes()
    set_data_progress(False)
    out = {"nodes": nodes, "seconds": {}}

    def lap(name: str) -> None:  # wall time per phase, for the report (never asserted)
        nonlocal t0
        out["seconds"][name], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()

    lap("cluster_start")
    try:
        cfg = smoke_config(work, "train.placement_strategy=STRICT_SPREAD", *NODE_LOSS)
        corpus = corpus_from_config(cfg.data)  # ingest
        lap("ingest")
        out["stream"] = noise_bank_on_other_node(corpus, nodes["node_b"])
        lap("stream")
        out["node_loss"] = lose_a_node_mid_run(cluster, cfg, work / "run", corpus)
        lap("pretrain_node_lost")
        out["never_placed"] = never_placed(work, corpus)
        lap("never_placed")
        student = out["node_loss"]["student_path"]
        (scores,) = evaluate_from_config(cfg, resolve_checkpoints(cfg, [student], work / "evaluate"),
                                         work / "evaluate")
        out["eval"] = scores.metrics()
        lap("evaluate")
        # one trial: its DDP ranks spread over both nodes (several trials on one node: tests/tune/test_sweep.py)
        sweep_cfg = smoke_config(work, "train.placement_strategy=STRICT_SPREAD", "train.total_steps=2",
                                 "train.warmup_steps=1", "train.checkpoint_every=2", "tune.num_samples=1",
                                 "tune.snr_ranges_db=[[0.0, 0.0]]", "tune.alphas=[0.5]", "tune.betas=[1.0]",
                                 "tune.max_concurrent=1")
        grid = run_sweep(sweep_cfg, work / "sweep")
        out["sweep"] = {"errors": [str(e) for e in grid.errors],
                        "hmean_all": [r.metrics.get("hmean_all") for r in grid],
                        "trial_digests": [read_digests(latest_checkpoint(p.parent.parent, p.name))
                                          for p in sorted((work / "sweep" / "trials").glob("*/pretrain/ray/*"))]}
        lap("sweep")
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return out


# ------------------------------------------------------------------------------------------ the test
def wall_time_added(reports: list) -> float:
    """How much later the run got where it was when node_b was lost: from the newest report before the loss to
    the first report of the restarted group at or past that step, less the ordinary steps in between (the median
    gap between the restarted group's reports)."""
    restart = next(i for i, (_, _, lost, resumed) in enumerate(reports) if lost and resumed is not None)
    reached, before_s = max((step, t) for step, t, _, _ in reports[:restart])
    step, again_s = next((step, t) for step, t, _, _ in reports[restart:] if step >= reached)
    gaps = sorted(b[1] - a[1] for a, b in zip(reports[restart:], reports[restart + 1:]))
    return again_s - before_s - (step - reached) * gaps[len(gaps) // 2]


@pytest.mark.reliability("node-lost")
def test_two_nodes_spread_workers_ship_the_noise_bank_survive_a_lost_node_and_match_one_node(
        ray_local, tmp_path, reliability_figures):
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.experiments import resolve_checkpoints
    from retain_asd.train.checkpoint import read_digests
    from retain_asd.train.launch import pretrain

    work = tmp_path / "cluster"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, __file__, str(work)], env=env, capture_output=True, text=True,
                           timeout=900, cwd=REPO)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-8000:]
    seen = json.loads((work / "result.json").read_text())
    print("2-node phases (s):", seen["seconds"])
    node_a, node_b = seen["nodes"]["node_a"], seen["nodes"]["node_b"]
    assert node_a != node_b

    # the noise bank reached node_b through the object store: the noise folder was gone from the disk,
    # node_b mixed every noise recording of the bank, and holds a copy of the driver's object
    s = seen["stream"]
    assert (s["node_id"], s["noise_dir_exists"]) == (node_b, False)
    assert s["rows"] > 0 and set(s["noise_ids"]) <= set(s["bank_noise_ids"])
    assert s["dataset_rows"] == s["planned_rows"] > 0
    assert s["state_locations"] == sorted([node_a, node_b]) and s["state_bytes"] > 0

    # node_b lost once the first checkpoint was complete (step 2), node_c joined: the group restarted from the
    # newest complete checkpoint on node_a + node_c and finished every step; one DDP rank per node, the same
    # student on both ranks at every checkpoint (before the loss, at the end, in the sweep)
    lost = seen["node_loss"]
    assert "node_c" in lost, "the run ended before its first checkpoint was seen complete"
    node_c = lost["node_c"]
    assert node_c not in (node_a, node_b)
    for digests, nodes in ((lost["first"]["digests"], {node_a, node_b}), (lost["digests"], {node_a, node_c}),
                           *((d, {node_a, node_c}) for d in seen["sweep"]["trial_digests"])):
        ranks = {int(r): d for r, d in digests.items()}
        assert sorted(ranks) == [0, 1]
        assert {ranks[0]["node_id"], ranks[1]["node_id"]} == nodes
        assert ranks[0]["student"] == ranks[1]["student"]
    summary = lost["summary"]
    assert (lost["first"]["step"], lost["step"], summary["status"], summary["steps"]) == (2, 6, "completed", 6)
    assert summary["restarts"] == summary["worker_failures"] >= 1  # every failure survived
    assert summary["resumed_from_step"] and min(summary["resumed_from_step"]) >= 2  # from a checkpoint, not step 0
    restart = next(i for i, (_, _, after_loss, resumed) in enumerate(lost["reports"]) if after_loss and resumed)
    reached = max(step for step, _, _, _ in lost["reports"][:restart])  # reported before the restarted group's
    assert summary["steps_lost"] == reached - summary["resumed_from_step"][0] >= 0  # reported, then done again
    added_s = wall_time_added(lost["reports"])
    assert all(lost["markers_verified"]) and lost["markers_verified"]  # every complete checkpoint intact
    # a group no node can hold (3 CPUs a worker): stopped after train.resource_wait_s, naming it; nothing written
    never = seen["never_placed"]
    assert never["error"] and "train.resource_wait_s = 2" in never["error"]
    assert never["events"] == ["resource_wait_exceeded", "fit_failed"] and never["checkpoints"] == []
    assert not seen["sweep"]["errors"] and len(seen["sweep"]["trial_digests"]) == 1
    assert len(seen["sweep"]["hmean_all"]) == 1 and all(0.0 <= h <= 1.0 for h in seen["sweep"]["hmean_all"])

    # the same config and corpus on one node (the session's Ray), without the loss: same weights (bit for bit:
    # the restart resumes weights, optimiser, RNGs and the stream position), same scores. The same corpus files
    # (not ingested again: that costs time and gives the same shards). The embedding cache is cleared so the
    # scores are recomputed.
    single = tmp_path / "single"
    cfg = smoke_config(work, *NODE_LOSS)
    with pytest.warns(UserWarning, match="RANDOM"):
        result = pretrain(cfg, single / "run")
    ranks = read_digests(result.checkpoint_path)
    assert ranks[0]["node_id"] == ranks[1]["node_id"] not in (node_a, node_b, node_c)
    assert ranks[0]["student"] == ranks[1]["student"] == lost["digests"]["0"]["student"]
    shutil.rmtree(work / "data" / "embeddings")
    (scores,) = evaluate_from_config(cfg, resolve_checkpoints(cfg, [str(result.student_path)], single / "evaluate"),
                                     single / "evaluate")
    one_node = scores.metrics()
    assert sorted(one_node) == sorted(seen["eval"])
    assert one_node == pytest.approx(seen["eval"], abs=1e-9)
    # nothing lost: every complete checkpoint verified, the student equal to the uninterrupted run's
    reliability_figures(steps_lost=summary["steps_lost"], retries=summary["restarts"], wall_added_s=added_s,
                        bytes_lost=0)


if __name__ == "__main__":  # the child: python tests/test_multinode.py WORK
    from retain_asd.runtime import apply_env_defaults, apply_local_ray_train_env

    apply_env_defaults()
    apply_local_ray_train_env()  # the simulated cluster is one machine: the embedded Ray's Ray Train settings
    os.environ.setdefault("TQDM_DISABLE", "1")
    work_dir = Path(sys.argv[1])
    work_dir.mkdir(parents=True, exist_ok=True)
    result = run_on_cluster(work_dir)
    (work_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
