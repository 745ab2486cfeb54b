"""`mlflow ui` on a demo-like store, as a trainer opens it: the address the demo prints shows the runs table with
the three rows. In headless Chromium when the machine has it (`apt-get install chromium`); the REST endpoints the
page reads are checked either way (the fallback where no browser can be had)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from retain_asd import tracking

ROWS = ("frozen", "denoise", "tagging_mixture")  # the demo's rows, one seed
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A store with the demo's experiment (three evaluation runs named by the one rule) and `mlflow ui` on it."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for row in ROWS:
        with tracking.mlflow_run(uri, "demo", tracking.run_name("evaluate", row, 0),
                                 tags={"kind": "evaluate", "preset": row, "seed": "0"}):
            tracking.log_metrics({"hmean_low_dn": 0.5})
    port = _free_port()
    log = open(root / "ui.log", "w")
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # 8-11 s on an idle machine
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"mlflow ui did not start on {base}: {(root / 'ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri, base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def _text(dom: str) -> str:
    """What the page shows: the DOM without scripts, styles and tags, white space collapsed."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S)))
    return " ".join(text.split())


def test_the_printed_address_opens_the_runs_table_in_a_browser(ui, tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); the REST test below covers the data")
    uri, base = ui
    page = tracking.runs_page(uri, "demo", base)
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=30000", "--dump-dom", page], capture_output=True, text=True,
                         timeout=240)
    assert "<title>Runs - Experiment" in out.stdout, out.stdout[:2000]  # the runs tab, not the GenAI overview
    text = _text(out.stdout)
    assert sorted(set(re.findall(r"evaluate-[a-z_]+-seed0", text))) == sorted(f"evaluate-{r}-seed0" for r in ROWS)
    assert "3 matching runs" in text and "Detect Issues" not in text  # no GenAI overview


def test_the_ui_endpoints_give_the_experiment_kind_and_the_three_runs(ui):
    """Fallback for machines without a browser: the AJAX endpoints the runs table reads."""
    uri, base = ui
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=demo") as r:
        experiment = json.load(r)["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    body = json.dumps({"experiment_ids": [experiment["experiment_id"]], "max_results": 100}).encode()
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/runs/search", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        runs = json.load(r)["runs"]
    assert sorted(r["info"]["run_name"] for r in runs) == sorted(f"evaluate-{row}-seed0" for row in ROWS)
    assert tracking.runs_page(uri, "demo", base) == \
        f"{base}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
