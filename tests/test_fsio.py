"""Torn files are never trusted: atomic writes with umask permissions, readers that skip temp files, errors that
name a torn file and the fix, and leftovers of killed runs removed at the next start."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retain_asd import fsio
from retain_asd.fsio import CorruptFileError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


# ---------------------------------------------------------------------------------------------------- writers
def _writers(tmp: Path):
    """(name, callable writing one file and returning its path) for every writer of a file read back."""
    import matplotlib.pyplot as plt

    from retain_asd.audio import write_audio
    from retain_asd.config import dump_yaml, load_config
    from retain_asd.corpus.labels import LabelVocab
    from retain_asd.eval import report
    from retain_asd.eval.dcase_files import write_anomaly_scores
    from retain_asd.eval.knn import MemoryBank
    from retain_asd.models.beats import beats_tiny, write_random_checkpoint

    def plot():
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        return report._save(fig, tmp / "plot.png")

    table = {"run": {("factory_a", 0): 0.6}}
    return {
        "config.yaml": lambda: dump_yaml(load_config("smoke"), tmp / "config.yaml"),
        "labels.json": lambda: LabelVocab(("fan_a",), ("tap",), {"fan_a": 1, "tap": 1}).to_json(tmp / "labels.json")
        or tmp / "labels.json",
        "student_beats.pt": lambda: write_random_checkpoint(tmp / "student_beats.pt", beats_tiny()),
        "clip.wav": lambda: write_audio(tmp / "clip.wav", np.full(160, 0.1)) or tmp / "clip.wav",
        "score csv": lambda: write_anomaly_scores(tmp / "scores", "fan", 0, ["a.wav"], np.array([0.5])),
        "table2.md": lambda: report.write_table2_markdown(table, tmp / "table2.md"),
        "table2.csv": lambda: report.write_table2_csv(table, tmp / "table2.csv"),
        "plot.png": plot,
        "bank.pt": lambda: MemoryBank("fan", torch.zeros(2, 3), torch.zeros(1, 3)).save(tmp / "bank.pt"),
        "mlflow_run.json": lambda: fsio.write_json(tmp / "mlflow_run.json", {"run_id": "x", "logged_step": 3}),
    }


WRITERS = ["config.yaml", "labels.json", "student_beats.pt", "clip.wav", "score csv", "table2.md", "table2.csv",
           "plot.png", "bank.pt", "mlflow_run.json"]


@pytest.mark.reliability("file-permissions")
@pytest.mark.parametrize("name", WRITERS)
def test_output_files_get_umask_permissions_and_leave_no_temp(name, tmp_path, umask_022):
    path = Path(_writers(tmp_path)[name]())
    assert stat.S_IMODE(path.stat().st_mode) == umask_022  # 0644, not mkstemp's 0600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.reliability("atomic-writes")
def test_a_writer_that_dies_leaves_the_old_file_and_no_temp(tmp_path):
    path = fsio.write_text(tmp_path / "out.json", '{"old": 1}\n')
    with pytest.raises(RuntimeError), fsio.atomic_write(path) as f:
        f.write('{"new": ')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.reliability("atomic-writes")
def test_sigkill_mid_write_leaves_the_old_file(tmp_path):
    """A real SIGKILL while the temp file is being written: the final name still holds the old content."""
    path = fsio.write_text(tmp_path / "state.json", '{"step": 3}\n')
    code = ("import os, signal, sys; from retain_asd import fsio\n"
            "with fsio.atomic_write(sys.argv[1]) as f:\n"
            "    f.write('{\"step\": 6'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, "PYTHONPATH": str(
        Path(__file__).resolve().parents[1])})
    assert proc.returncode == -9
    assert fsio.read_json(path) == {"step": 3}
    leftovers = [p for p in tmp_path.iterdir() if fsio.is_temp(p)]
    assert len(leftovers) == 1  # the killed writer's temp file ...
    assert fsio.remove_stale_temps(tmp_path) == leftovers  # ... goes at the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.reliability("ingest-temp-leftover")
def test_stale_temps_removed_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getpid()
    (tmp_path / f".machine.tmp-{dead}-abc123").mkdir()
    (tmp_path / f".machine.tmp-{dead}-abc123" / "part-0.parquet").write_bytes(b"x" * 1000)
    (tmp_path / f".labels.json.tmp-{dead}-0f0f0f").write_text("{")
    (tmp_path / f".noise.tmp-{live}-beef01").mkdir()  # a writer still at work
    (tmp_path / "machine").mkdir()
    removed = fsio.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [f".labels.json.tmp-{dead}-0f0f0f", f".machine.tmp-{dead}-abc123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".noise.tmp-{live}-beef01", "machine"]


@pytest.mark.reliability("ingest-temp-leftover")
def test_ingest_rerun_removes_the_temp_folder_of_a_killed_ingest(small_corpus):
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.shards import DecodeSettings

    corpus = small_corpus / "corpus"
    killed = corpus / f".machine.tmp-{dead_pid()}-c0ffee"
    killed.mkdir()
    (killed / "part-00000.parquet").write_bytes(os.urandom(4096))  # a shard cut short
    result = ingest(small_corpus / "synth" / "machines", small_corpus / "synth" / "noise", corpus,
                    settings=DecodeSettings(clip_s=2.0))
    assert not killed.exists()
    assert not result.machine.rebuilt  # the finished shards were kept, only the leftover went
    assert not [p for p in corpus.iterdir() if fsio.is_temp(p)]


# ---------------------------------------------------------------------------------------------------- readers
@pytest.mark.reliability("torn-metrics")
def test_torn_last_line_of_metrics_is_dropped_and_the_next_append_starts_a_new_line(tmp_path):
    from retain_asd.train.launch import read_metrics

    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        fsio.append_line(path, json.dumps({"step": step, "loss": 1.0 / step}))
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # the driver was killed mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    fsio.append_line(path, json.dumps({"step": 3, "loss": 0.3}))  # the resumed run reports step 3 again
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


@pytest.mark.reliability("torn-metrics")
def test_a_bad_line_inside_metrics_names_the_file_and_line(tmp_path):
    from retain_asd.train.launch import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(CorruptFileError, match=r"metrics\.jsonl: cannot be read \(line 2"):
        read_metrics(path)


@pytest.mark.reliability("torn-mlflow-pointer")
@pytest.mark.parametrize("content", ["", '{"run_id": "ab'])
def test_empty_or_torn_mlflow_run_pointer_names_the_file_and_the_fix(tmp_path, content):
    from retain_asd.config import load_config
    from retain_asd.train.launch import _tracked_run

    cfg = load_config("smoke", overrides=[f"data.work_dir={tmp_path / 'data'}"])
    (tmp_path / "mlflow_run.json").write_text(content)
    with pytest.raises(CorruptFileError) as err:
        with _tracked_run(cfg, tmp_path, track=True):
            pass
    assert str(tmp_path / "mlflow_run.json") in str(err.value) and "delete it" in str(err.value)


@pytest.mark.reliability("torn-train-state")
def test_torn_train_state_names_the_file_and_the_fix(tmp_path):
    from retain_asd.train.checkpoint import TRAIN_STATE, read_train_state
    from retain_asd.train.launch import _checkpoint_step

    folder = tmp_path / "checkpoint_000001"
    fsio.save_torch({"step": 6, "student": {"w": torch.ones(1000)}}, folder / TRAIN_STATE)
    data = (folder / TRAIN_STATE).read_bytes()
    (folder / TRAIN_STATE).write_bytes(data[: len(data) // 2])
    for read in (read_train_state, _checkpoint_step):
        with pytest.raises(CorruptFileError) as err:
            read(folder)
        assert str(folder / TRAIN_STATE) in str(err.value) and f"delete the folder {folder}" in str(err.value)


@pytest.mark.reliability("torn-cache-temp")
def test_embedding_cache_skips_temp_files_and_drops_a_torn_chunk(tmp_path):
    from retain_asd.eval.embed import EmbeddingCache

    cache = EmbeddingCache(tmp_path, "0" * 40, "genrep")
    cache.put(["a", "b"], 2, np.ones((2, 4)))
    folder = cache.dir / "layer_2"
    (folder / ".deadbeef.1a2b3c.tmp.npz").write_bytes(b"PK\x03\x04 torn")  # name of an older version
    (folder / f".cafe.npz.tmp-{dead_pid()}-abcdef").write_bytes(b"PK\x03\x04 torn")
    (folder / f".live.npz.tmp-{os.getpid()}-abcdef").write_bytes(b"PK\x03\x04 torn")
    (folder / "torn0000.npz").write_bytes(b"PK\x03\x04 torn chunk")  # not possible with atomic writes; still
    fresh = EmbeddingCache(tmp_path, "0" * 40, "genrep")
    assert fresh.missing(["a", "b", "c"], [2]) == ["c"]
    np.testing.assert_array_equal(fresh.get(["b", "a"], 2), np.ones((2, 4), np.float32))
    names = sorted(p.name for p in folder.iterdir())
    assert "torn0000.npz" not in names and f".live.npz.tmp-{os.getpid()}-abcdef" in names
    assert not any(".tmp-" in n and str(os.getpid()) not in n for n in names)


@pytest.mark.reliability("torn-labels")
def test_torn_labels_json_and_manifest_name_the_file_and_the_fix(tmp_path):
    from retain_asd.corpus.labels import LabelVocab
    from retain_asd.corpus.shards import read_manifest

    (tmp_path / "labels.json").write_text('{"schema_version": 1, "machine_cl')
    with pytest.raises(CorruptFileError, match=r"labels\.json: cannot be read .*ingest --force"):
        LabelVocab.from_json(tmp_path / "labels.json")
    (tmp_path / "manifest.json").write_text("")
    with pytest.raises(CorruptFileError, match=r"manifest\.json: cannot be read \(empty file\).*ingest --force"):
        read_manifest(tmp_path)


@pytest.mark.reliability("torn-labels")
def test_torn_bank_names_the_file(tmp_path):
    from retain_asd.eval.knn import MemoryBank

    path = MemoryBank("fan", torch.zeros(20, 30), torch.zeros(2, 30)).save(tmp_path / "bank.pt")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match=r"bank\.pt: cannot be read .*score bank"):
        MemoryBank.load(path)


@pytest.mark.reliability("atomic-writes")
def test_recursive_clean_up_reaches_nested_score_folders(tmp_path):
    nested = tmp_path / "run" / "scores" / "factory_a" / "snr_0" / "raw"
    nested.mkdir(parents=True)
    stale = nested / f".anomaly_score_fan_section_00_test.csv.tmp-{dead_pid()}-a1b2c3"
    stale.write_text("a.wav,0.")
    kept = fsio.write_text(nested / "anomaly_score_fan_section_01_test.csv", "a.wav,0.5\n")
    assert fsio.remove_stale_temps(tmp_path, recursive=True) == [stale]
    assert sorted(nested.iterdir()) == [kept]


# ---------------------------------------------------------------------------------------------------- run lock
def _lock_of(pid: int, host: str | None = None, started_unix: float | None = None) -> dict:
    import socket
    import time

    return {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00 UTC",
            "started_unix": time.time() if started_unix is None else started_unix, "command": "retain-asd pretrain x"}


@pytest.mark.reliability("two-runs-one-out")
def test_run_lock_refuses_a_live_holder_takes_over_a_dead_one_and_is_reentrant(tmp_path):
    lock = tmp_path / fsio.RUN_LOCK
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps(_lock_of(live.pid)))
        with pytest.raises(fsio.RunLockedError, match=rf"pid {live.pid} on .*started 2026-01-01 00:00:00 UTC"):
            with fsio.run_lock(tmp_path):
                pass
        # the same pid, but a process that started after the lock was written: a reused pid, so the lock is stale
        lock.write_text(json.dumps(_lock_of(live.pid, started_unix=0.0)))
        with fsio.run_lock(tmp_path) as stale:
            assert stale["pid"] == live.pid
    finally:
        live.kill()
        live.wait()
    lock.write_text(json.dumps(_lock_of(dead_pid())))
    with fsio.run_lock(tmp_path, "first") as stale:
        assert stale is not None
        mine = json.loads(lock.read_text())
        assert (mine["pid"], mine["command"]) == (os.getpid(), "first")
        with fsio.run_lock(tmp_path) as again:  # re-entrant: the CLI and the library it calls
            assert again is None
        assert lock.is_file()
    assert not lock.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file left
    with fsio.run_lock(tmp_path / "new"):  # a folder the lock made is removed again when nothing was written
        assert (tmp_path / "new" / fsio.RUN_LOCK).is_file()
    assert not (tmp_path / "new").exists()


@pytest.mark.reliability("two-runs-one-out")
def test_run_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / fsio.RUN_LOCK).write_text(json.dumps(_lock_of(dead_pid(), host="gpu-node-7")))
    with pytest.raises(fsio.RunLockedError, match="on gpu-node-7.*another host.*delete"):
        with fsio.run_lock(tmp_path):
            pass
