"""Safe defaults, each in the situation a user meets: a GPU node with a paper preset, a pretrain after an
ingest of real data, `--checkpoint <pretrain out folder>` / NAME=PATH, a DCASE 2020 tree, a bare sweep."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retain_asd.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- GPU
def test_use_gpu_is_auto_by_default_and_accepts_yaml_booleans():
    assert load_config("tagging_mixture_pm5").train.use_gpu == "auto"
    assert load_config("smoke", overrides=["train.use_gpu=true"]).train.use_gpu == "true"
    assert load_config("smoke", overrides=["train.use_gpu=false"]).train.use_gpu == "false"
    with pytest.raises(ConfigError, match="train.use_gpu"):
        load_config("smoke", overrides=["train.use_gpu=sometimes"])


@pytest.mark.ray
def test_the_embedded_ray_polls_its_train_workers_every_0_2_s(ray_local):
    """The embedded Ray (the session's, started by init_ray) gets the local Ray Train settings; a value the user
    set wins."""
    import os

    from retain_asd.runtime import LOCAL_RAY_TRAIN_ENV, apply_local_ray_train_env

    assert {k: os.environ[k] for k in LOCAL_RAY_TRAIN_ENV} == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                                                               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    mine = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "5"}
    apply_local_ray_train_env(mine)
    assert mine == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.mark.ray
def test_auto_uses_the_gpus_a_cluster_has(ray_local):
    from retain_asd.train.launch import resolve_use_gpu

    assert resolve_use_gpu("auto") is False  # this machine: no GPU in the cluster
    assert resolve_use_gpu("true") is True and resolve_use_gpu("false") is False
    # A GPU node (Ray told it has one GPU): the paper preset's workers ask for a GPU each.
    code = ("import ray; from retain_asd.runtime import apply_env_defaults; apply_env_defaults(); "
            "ray.init(address='local', num_cpus=1, num_gpus=1, include_dashboard=False, "
            "object_store_memory=80*1024**2); "
            "from retain_asd.train.launch import resolve_use_gpu; from retain_asd.config import load_config; "
            "print(resolve_use_gpu(load_config('tagging_mixture_pm5').train.use_gpu)); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    answers = [line for line in out.stdout.splitlines() if line in ("True", "False")]
    assert answers == ["True"], (out.stdout[-1000:], out.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------- corpus
@pytest.mark.ray
def test_a_real_corpus_is_never_replaced_by_the_synthetic_one(small_worlds, tmp_path, capfd, ray_local):
    from pipelines.cli import main
    from retain_asd.corpus import shards
    from retain_asd.corpus.ingest import pretrain_corpus_dir, pretrain_corpus_from_config

    roots = dict(o.split("=", 1) for o in small_worlds)
    real_machines, real_noise = Path(roots["data.machine_root"]), Path(roots["data.noise_root"])
    evals = [o for o in small_worlds if o.startswith("eval.")]
    work = tmp_path / "work"
    assert main(["ingest", "--preset", "smoke", "--machine-root", str(real_machines), "--noise-root", str(real_noise),
                 "--out", str(work), *evals]) == 0
    said = capfd.readouterr()  # the people's console: the summaries; Ray (Data)'s own lines in the log
    assert "pre-training corpus:" in said.out and "protocol:" in said.out, said
    assert "INFO" not in said.out + said.err and f"logs of Ray and MLflow: {work / 'ingest.log'}" in said.out
    cfg = load_config("smoke", overrides=[f"data.work_dir={work}", *evals])
    shard_dir = pretrain_corpus_dir(cfg) / "machine"
    before = shards.read_manifest(shard_dir)
    # The user's next step without repeating the roots: stopped, told which roots to pass.
    assert main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "run"), f"data.work_dir={work}",
                 *evals]) == 2
    err = capfd.readouterr().err
    assert f"data.machine_root={real_machines.resolve()}" in err and "synthetic" in err
    assert shards.read_manifest(shard_dir) == before  # untouched
    half = load_config("smoke", overrides=[f"data.work_dir={work}", f"data.machine_root={real_machines}", *evals])
    with pytest.raises(FileExistsError, match=f"data.noise_root={real_noise.resolve()}"):
        pretrain_corpus_from_config(half)  # each corpus folder is guarded: the noise root is still missing
    ok = load_config("smoke", overrides=[f"data.work_dir={work}", *small_worlds])
    assert not pretrain_corpus_from_config(ok).machine.rebuilt  # the roots given: the same corpus, reused


# ---------------------------------------------------------------------------------------------------- checkpoint
def test_checkpoint_accepts_a_pretrain_out_folder_and_name_equals_path(tmp_path):
    from retain_asd.config import dump_yaml
    from retain_asd.eval.builder import provenance
    from retain_asd.experiments import resolve_checkpoint
    from retain_asd.fsio import write_json

    cfg = load_config("smoke", overrides=[f"data.work_dir={tmp_path / 'data'}", "train.seed=3"])
    out = tmp_path / "runs" / "smoke"  # what `retain-asd pretrain --out runs/smoke` leaves: 8 .pt files
    for rel in ("student_beats.pt", "init_beats_tiny_seed3.pt", "ray/smoke/checkpoint_1/train_state.pt",
                "ray/smoke/checkpoint_2/train_state.pt", "ray/smoke/checkpoint_3/train_state.pt",
                "ray/smoke/checkpoint_4/train_state.pt", "ray/smoke/checkpoint_5/train_state.pt",
                "ray/smoke/checkpoint_6/train_state.pt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    dump_yaml(cfg, out / "config.yaml")
    write_json(out / "mlflow_run.json", {"run_id": "abc123"})
    name, path, frozen = resolve_checkpoint(str(out), cfg, tmp_path)
    assert (name, path, frozen) == ("smoke", str(out / "student_beats.pt"), False)
    origin = provenance(path)
    assert (origin["preset"], origin["seed"], origin["pretrain_run_id"]) == ("smoke", 3, "abc123")
    assert resolve_checkpoint(f"tm_pm5={out}", cfg, tmp_path)[:2] == ("tm_pm5", str(out / "student_beats.pt"))
    with pytest.raises(ValueError, match="NAME in NAME=PATH"):
        resolve_checkpoint(f"bad name={out}", cfg, tmp_path)
    (out / "student_beats.pt").unlink()  # an unfinished run: a clear error, not "found 7 .pt files"
    with pytest.raises(FileNotFoundError, match="no student_beats.pt"):
        resolve_checkpoint(str(out), cfg, tmp_path)


# ---------------------------------------------------------------------------------------------------- DCASE 2020
def _dcase2020_tree(shared_data: Path, root: Path) -> Path:
    """A DCASE 2020 dev tree from the real clips: <root>/<machine>/{train,test}/{normal,anomaly}_id_00_*.wav."""
    src = shared_data / "machine" / "dcase2020t2_dev_id00"
    normals = sorted((src / "train").glob("normal_id_00_*.wav"))
    machine = root / "fan"
    for folder in ("train", "test"):
        (machine / folder).mkdir(parents=True)
    for p in normals[:12]:
        shutil.copy(p, machine / "train" / p.name)
    for p in normals[12:16]:
        shutil.copy(p, machine / "test" / p.name)
    shutil.copy(src / "test" / "anomaly_id_00_00000000.wav", machine / "test")
    toy = shared_data / "machine" / "dcase2020t2_dev_id01_toycar" / "anomaly_id_01_00000000.wav"
    shutil.copy(toy, machine / "test" / "anomaly_id_00_00000001.wav")  # a second real anomalous clip
    return root


def test_evaluate_on_a_dcase2020_tree_gives_source_only_figures_or_refuses(shared_data, tmp_path, capsys):
    from pipelines.evaluate import main
    from retain_asd.models.beats import beats_tiny, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "ckpt.pt", beats_tiny(), seed=0)
    tree = _dcase2020_tree(shared_data, tmp_path / "dcase2020")
    common = ["--preset", "smoke", "--checkpoint", str(ckpt), f"data.work_dir={tmp_path / 'work'}",
              "data.clip_s=2.0", "eval.layer=2"]
    assert main([*common, "--dcase-root", str(tree), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "dcase/official=" in out and "source domain only: AUC + pAUC" in out
    table = (tmp_path / "out" / "ckpt" / "dcase_table.md").read_text()
    assert table.startswith("Source domain only (DCASE 2020 layout)") and "| fan_section_00 |" in table
    # The two folders of the shared data as they are: no section has tests of both labels -> a clear refusal.
    assert main([*common, "--dcase-root", str(shared_data / "machine"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "nothing to score" in err and "both labels" in err


# ---------------------------------------------------------------------------------------------------- sweep
def test_a_bare_sweep_is_refused(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, before Ray or any trial starts
        main(["sweep", "--out", "/nonexistent/sweep"])
    assert exit_info.value.code == 2
    assert "give --preset NAME or --config FILE" in capsys.readouterr().err
