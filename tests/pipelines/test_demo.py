"""`retain-asd demo`: the people's console. Its whole output (both file descriptors) stays within 60 lines,
without a traceback or Ray's logs, names the log file, the MLflow store and the `mlflow ui` command, and holds
the table with the rows and their hmean_low / hmean_all; a second run reuses everything and skips the rows."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from pipelines.cli import COMMANDS, main
from retain_asd.config import load_config

REPO = Path(__file__).resolve().parents[2]

# The smoke config at its smallest: 1 s clips, one SNR, a few evaluation clips, 6 training steps.
SMALL = ["study.rows=[frozen, denoise]", "study.seeds=[0]", "data.clip_s=1.0", "eval.snrs_db=[0.0]",
         "eval.ssl_layer=2", "eval.source_refs=2", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2",
         "tracking.experiment=demo-test"]


def help_example_paths() -> dict[str, str]:
    """{path: where} of every file under runs/demo/ that a command's --help, docs/your-own-data.md or a command
    example of README.md (its ```bash blocks) names."""
    texts = {f"retain-asd {name} --help": importlib.import_module(module).build_parser().format_help()
             for name, (module, _) in COMMANDS.items()}
    texts["docs/your-own-data.md"] = (REPO / "docs/your-own-data.md").read_text()
    texts["README.md"] = "\n".join(re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S))
    found = {}
    for where, text in texts.items():
        for path in re.findall(r"runs/demo/[^\s'\"`),:]+", text.replace("\\\n", " ")):
            if Path(path).suffix:  # a file the demo writes (folders such as --out runs/demo/table3 are made later)
                found.setdefault(path, where)
    return found


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
    rows = {line.split()[0]: line for line in console if line.startswith(("frozen ", "denoise "))}
    assert set(rows) == {"frozen", "denoise"} and all(r.split()[1] == "1" for r in rows.values())  # seeds
    # one seed: both All figures with their test-clip intervals, and frozen's difference against denoise (a call
    # only when its interval excludes 0)
    assert (rows["denoise"].count(" ± "), rows["frozen"].count(" ± ")) == (2, 3) and "(base)" in rows["denoise"]
    assert re.search(r" [+-]\d+\.\d\d ± \d+\.\d\d (better|worse|no difference) ", rows["frozen"])
    assert "95% interval over 1 training seed (no seed term) and 100 bootstrap draws of the test clips" in joined
    assert "mlflow ui --backend-store-uri sqlite:///" in joined and "experiment 'demo-test'" in joined
    assert "retain-asd compare --experiment demo-test --metric hmean_low_dn" in joined

    # every file path a help text, the own-data guide or a README example gives under runs/demo/ is one the demo writes
    demo_rows = [r.split(":")[0] for r in load_config("demo").study.rows]
    examples = help_example_paths()
    assert "runs/demo/rows/tagging_mixture/seed0/pretrain/student_beats.pt" in examples
    for path, where in examples.items():
        row = re.search(r"/rows/([^/]+)/", path)
        if row:  # the test demo ran frozen and denoise; the row named must be one the demo preset runs
            assert row.group(1) in demo_rows, f"{where}: {path}: no row {row.group(1)!r} in the demo"
            path = path.replace(row.group(0), "/rows/denoise/")
        assert (out / path[len("runs/demo/"):]).exists(), f"{where}: {path} is not written by the demo"

    # a second run reuses the encoder, the corpora and the finished rows
    assert main(["demo", "--preset", "smoke", "--out", str(out), *SMALL, *small_worlds]) == 0
    again = capfd.readouterr()
    lines = (again.out + again.err).splitlines()
    assert sum("done earlier, skipped" in line for line in lines) == 2
    assert [line for line in lines if line.startswith(("frozen ", "denoise "))] == \
        [line for line in console if line.startswith(("frozen ", "denoise "))]
