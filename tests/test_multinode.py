"""Scale-out on a simulated 2-node Ray cluster (`ray.cluster_utils.Cluster`): two raylets with their own object
stores on this machine, one DDP worker per node (STRICT_SPREAD).

The cluster runs in a child process (``python tests/test_multinode.py WORK``): the session's embedded Ray
(`ray_local`) stays untouched, and the child's nodes are torn down with it. On the cluster: ingest, the
stream's state shipped to the other node, a smoke pre-training stopped after a checkpoint and resumed, an
evaluation and a 1-trial sweep. The child writes what it saw to WORK/result.json; the test compares it with
a single-node run of the same config in the session's Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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


# ------------------------------------------------------------------------------------------ child process
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
    from retain_asd.train.launch import latest_checkpoint, pretrain
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
        cfg = smoke_config(work, "train.placement_strategy=STRICT_SPREAD")
        corpus = corpus_from_config(cfg.data)  # ingest
        lap("ingest")
        out["stream"] = noise_bank_on_other_node(corpus, nodes["node_b"])
        lap("stream")
        first = pretrain(cfg, work / "run", corpus=corpus, stop_at_step=3)
        out["first"] = {"step": first.step, "digests": read_digests(first.checkpoint_path)}
        second = pretrain(cfg, work / "run", corpus=corpus)  # resumes from the step-3 checkpoint
        out["second"] = {"step": second.step, "digests": read_digests(second.checkpoint_path),
                         "resumed_from": [m.get("resumed_from_step") for m in second.metrics if m["step"] > 3]}
        lap("pretrain_stop_and_resume")
        (scores,) = evaluate_from_config(cfg, resolve_checkpoints(cfg, [str(second.student_path)], work / "evaluate"),
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
def test_two_nodes_spread_workers_ship_the_noise_bank_and_match_one_node(ray_local, tmp_path):
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

    # one DDP rank per node, the same student on both ranks at every checkpoint
    for run in (seen["first"], seen["second"], *({"digests": d} for d in seen["sweep"]["trial_digests"])):
        ranks = {int(r): d for r, d in run["digests"].items()}
        assert sorted(ranks) == [0, 1]
        assert {ranks[0]["node_id"], ranks[1]["node_id"]} == {node_a, node_b}
        assert ranks[0]["student"] == ranks[1]["student"]
    assert (seen["first"]["step"], seen["second"]["step"]) == (3, 6)
    assert seen["second"]["resumed_from"][0] == 3
    assert not seen["sweep"]["errors"] and len(seen["sweep"]["trial_digests"]) == 1
    assert len(seen["sweep"]["hmean_all"]) == 1 and all(0.0 <= h <= 1.0 for h in seen["sweep"]["hmean_all"])

    # the same config and corpus on one node (the session's Ray), without the stop: same weights, same
    # scores. Same corpus files: a re-ingest may order the rows of a shard differently, and the stream's
    # draws index rows. The embedding cache is cleared so the scores are recomputed.
    single = tmp_path / "single"
    cfg = smoke_config(work)
    with pytest.warns(UserWarning, match="RANDOM"):
        result = pretrain(cfg, single / "run")
    ranks = read_digests(result.checkpoint_path)
    assert ranks[0]["node_id"] == ranks[1]["node_id"] not in (node_a, node_b)
    assert ranks[0]["student"] == ranks[1]["student"] == seen["second"]["digests"]["0"]["student"]
    shutil.rmtree(work / "data" / "embeddings")
    (scores,) = evaluate_from_config(cfg, resolve_checkpoints(cfg, [str(result.student_path)], single / "evaluate"),
                                     single / "evaluate")
    one_node = scores.metrics()
    assert sorted(one_node) == sorted(seen["eval"])
    assert one_node == pytest.approx(seen["eval"], abs=1e-9)


if __name__ == "__main__":  # the child: python tests/test_multinode.py WORK
    from retain_asd.runtime import apply_env_defaults

    apply_env_defaults()
    os.environ.setdefault("TQDM_DISABLE", "1")
    work_dir = Path(sys.argv[1])
    work_dir.mkdir(parents=True, exist_ok=True)
    result = run_on_cluster(work_dir)
    (work_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
