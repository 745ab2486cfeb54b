"""`retain-asd demo`: the people's console. Its whole output (both file descriptors) stays within 60 lines,
without a traceback or Ray's logs, names the log file, the MLflow store and the `mlflow ui` command, and holds
the table with the rows and their hmean_low / hmean_all; a second run reuses everything and skips the rows."""

from __future__ import annotations

from pipelines.cli import main

# The smoke config at its smallest: 1 s clips, one SNR, a few evaluation clips, 6 training steps.
SMALL = ["study.rows=[frozen, denoise]", "study.seeds=[0]", "data.clip_s=1.0", "eval.snrs_db=[0.0]",
         "eval.ssl_layer=2", "eval.source_refs=2", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2",
         "tracking.experiment=demo-test"]


def test_demo_console_is_short_and_quiet(tmp_path, capfd, ray_local, small_worlds):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--out", str(out), *SMALL, *small_worlds]) == 0
    text = capfd.readouterr()
    console = (text.out + text.err).splitlines()
    assert len(console) <= 60, "\n".join(console)
    joined = "\n".join(console)
    assert "Traceback" not in joined and "INFO" not in joined and "(RayTrainWorker" not in joined
    assert f"logs of Ray and MLflow: {out / 'demo.log'}" in joined
    assert (out / "demo.log").stat().st_size > 0  # what did not reach the console is there
    rows = {line.split()[0]: line.split() for line in console if line.startswith(("frozen ", "denoise "))}
    assert set(rows) == {"frozen", "denoise"} and all(len(r) == 6 for r in rows.values())  # seeds, 2 x 2 hmeans
    assert "mlflow ui --backend-store-uri sqlite:///" in joined and "experiment 'demo-test'" in joined
    assert "retain-asd compare --experiment demo-test --metric hmean_low_dn" in joined

    # a second run reuses the encoder, the corpora and the finished rows
    assert main(["demo", "--preset", "smoke", "--out", str(out), *SMALL, *small_worlds]) == 0
    again = capfd.readouterr()
    lines = (again.out + again.err).splitlines()
    assert sum("done earlier, skipped" in line for line in lines) == 2
    assert [line for line in lines if line.startswith(("frozen ", "denoise "))] == \
        [line for line in console if line.startswith(("frozen ", "denoise "))]
