"""`retain-asd inspect-stream`: the real training stream of a preset, batch by batch, against iid mixing."""

from __future__ import annotations

import json

import numpy as np

from pipelines.cli import main


def test_inspect_stream_json_numbers(tmp_path, capsys, ray_local):
    # the smoke preset on 1 s clips (fast); shards of 16 rows, so a batch spans several shards
    over = [f"data.work_dir={tmp_path}", "data.clip_s=1.0", "data.rows_per_shard=16", "data.audio_dtype=int16"]
    assert main(["inspect-stream", "--preset", "smoke", "--batches", "12", "--json", *over]) == 0
    r = json.loads(capsys.readouterr().out)
    c, b = r["machine_classes"], r["batch_size"]
    assert (c, b, len(r["batches"])) == (40, 16, 12)  # 5 pre-training machines x 8 attribute classes, --batch-size
    assert all(len(batch) == b and all(0 <= m < c for m in batch) for batch in r["batches"])
    distinct = [len(set(batch)) for batch in r["batches"]]
    assert r["mean_distinct_machine_classes"] == np.mean(distinct)
    assert abs(r["iid_expectation"] - c * (1 - (1 - 1 / c) ** b)) < 1e-9
    assert r["mean_distinct_machine_classes"] >= 0.9 * r["iid_expectation"]  # well mixed, not one shard
    assert sum(r["snr_histogram"]["counts"]) == 12 * b
    lo, hi = r["snr_histogram"]["edges_db"][0], r["snr_histogram"]["edges_db"][-1]
    assert -5.0 <= lo < hi <= 5.0  # smoke: SNR ~ U[-5, 5] dB
    assert sum(r["noise_usage"].values()) == 12 * b and len(r["noise_usage"]) == 4
    assert r["clips_per_s"] > 0

    assert main(["inspect-stream", "--preset", "smoke", "--batches", "2", *over]) == 0
    text = capsys.readouterr().out
    assert "batch   1:" in text and "iid expectation" in text and "noise usage" in text
