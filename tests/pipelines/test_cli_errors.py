"""Entry points fail early and clearly on bad input: exit code 2 and a message naming the file and the fix."""

from __future__ import annotations

import pytest


def test_evaluate_missing_checkpoint_fails_before_any_work(tmp_path, capsys):
    from pipelines.common import run_main
    from pipelines.evaluate import main

    missing = tmp_path / "BEATs_student.pt"
    code = run_main(main, ["--preset", "smoke", "--checkpoint", str(missing), "--out", str(tmp_path / "out"),
                           f"data.work_dir={tmp_path / 'work'}"])
    assert code == 2
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "work" / "evalsets").exists()  # the eval sets were not built first


def test_evaluate_frozen_with_missing_model_checkpoint(tmp_path, capsys):
    from pipelines.common import run_main
    from pipelines.evaluate import main

    code = run_main(main, ["--preset", "frozen", "--checkpoint", "frozen", "--out", str(tmp_path / "out"),
                           f"data.work_dir={tmp_path / 'work'}", f"model.checkpoint={tmp_path / 'BEATs_iter3.pt'}"])
    assert code == 2
    assert "BEATs_iter3.pt': file not found" in capsys.readouterr().err


@pytest.mark.ray
def test_ingest_missing_corpus_folder(tmp_path, capsys, ray_local):
    from pipelines.ingest import main

    code = main(["--machine-root", str(tmp_path / "nope"), "--noise-root", str(tmp_path / "noise"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{tmp_path / 'nope'}: corpus folder does not exist" in capsys.readouterr().err


def test_ingest_of_one_machine_folder_says_pass_its_parent_before_any_work(shared_data, tmp_path, capsys):
    from pipelines.cli import main

    machine = (shared_data / "machine/dcase2020t2_dev_id00").resolve()  # one machine's folder: train/, test/
    out = tmp_path / "work"
    assert main(["ingest", "--machine-root", str(machine), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"retain-asd ingest: {machine}: this looks like one machine's folder (it holds ['test', 'train']); "
                   f"pass its parent, {machine.parent}, whose subfolders are the machines\n")
    assert not out.exists()  # nothing synthesised, no Ray started for it


def test_pretrain_without_a_config_is_a_usage_error(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--out", "x"])
    assert exit_info.value.code == 2
    assert "give --preset NAME or --config FILE" in capsys.readouterr().err


def test_unknown_command(capsys):
    from pipelines.cli import main

    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ validate before work
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.reliability("config-validation")
@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=.inf", "train.lr = inf: must be a finite number"),
    ("train.lr=1e400", "train.lr = inf: must be a finite number"),
    ("objective.alpha=.inf", "objective.alpha = inf: must be a finite number"),
    ("objective.beta=-1", "objective.alpha/beta = (1.0, -1.0): must be >= 0"),
    ("eval.batch_size=0", "eval.batch_size = 0: must be > 0"),
    ("eval.layer=99", "eval.layer = 99: must be a 1-based layer index"),
    ("train.max_failures=-5", "train.max_failures = -5: must be >= 0"),
    ("train.batch_size=0", "train.batch_size = 0: must be > 0"),
    ("mixing.snr_high_db=.nan", "mixing.snr_high_db = nan: must be a finite number"),
    ("tune.alphas=[1.0, .inf]", "tune.alphas[1] = inf: must be a finite number"),
    ("tune.betas=[-0.5]", "tune.betas = (-0.5,): must be a non-empty list of weights >= 0"),
    ("train.lr=[1,", "the value is not valid YAML"),
])
def test_bad_config_values_are_one_line_errors(override, message, capsys):
    from pipelines.cli import main

    assert main(["config", "show", "smoke", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.reliability("config-validation")
def test_pretrain_rejects_an_infinite_lr_before_ray_starts(tmp_path):
    """The whole entry point, as a user runs it: one line, exit code 2, no traceback, no Ray, no output."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", "--preset", "smoke", "--out", str(out),
                           "train.lr=.inf"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "train.lr = inf: must be a finite number" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and "Ray" not in proc.stderr


@pytest.mark.reliability("config-validation")
def test_sweep_rejects_a_bad_sweep_value_before_ray_starts(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["sweep", "--preset", "smoke", "--out", str(tmp_path / "sweep"), "tune.alphas=[1.0, -2.0]"]) == 2
    assert "tune.alphas = (1.0, -2.0): must be a non-empty list of weights >= 0" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_every_sweep_point_is_a_valid_config():
    from retain_asd.config import load_config
    from tune.space import check_trials

    assert check_trials(load_config("smoke", overrides=["tune.alphas=[0.5, 1.0]"])) == 2 * 2 * 1


# ---------------------------------------------------------------------------------------------------- checkpoints
def _tiny_checkpoints(tmp_path):
    from retain_asd.models.beats import beats_tiny, write_random_checkpoint

    good = write_random_checkpoint(tmp_path / "good.pt", beats_tiny())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return good, truncated


@pytest.mark.reliability("evaluate-bad-checkpoint")
def test_evaluate_checks_every_checkpoint_before_using_any(tmp_path, capsys):
    from pipelines.cli import main

    good, truncated = _tiny_checkpoints(tmp_path)
    out = tmp_path / "out"
    code = main(["evaluate", "--preset", "smoke", "--checkpoint", str(good), "--checkpoint", str(truncated),
                 "--out", str(out), f"data.work_dir={tmp_path / 'work'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{truncated}: not a readable torch checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2 and "--debug" in err  # the message, then the hint
    assert not (tmp_path / "work" / "evalsets").exists() and not (out / "good").exists()  # nothing evaluated


@pytest.mark.parametrize("command", ["table3", "layers"])
def test_analyses_check_every_checkpoint_before_using_any(tmp_path, capsys, command):
    from pipelines.cli import main

    good, truncated = _tiny_checkpoints(tmp_path)
    out = tmp_path / "out"
    code = main([command, "--preset", "smoke", "--checkpoint", str(good), "--checkpoint", str(truncated),
                 "--out", str(out), f"data.work_dir={tmp_path / 'work'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"retain-asd {command}: error: {truncated}: not a readable torch checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2 and "--debug" in err
    assert not (tmp_path / "work" / "evalsets").exists() and not (out / f"{command}.md").exists()  # nothing ran


@pytest.mark.reliability("evaluate-bad-checkpoint")
def test_evaluate_layer_beyond_the_checkpoint_depth(tmp_path, capsys):
    from pipelines.cli import main

    good, _ = _tiny_checkpoints(tmp_path)
    code = main(["evaluate", "--preset", "smoke", "--checkpoint", str(good), "--out", str(tmp_path / "out"),
                 f"data.work_dir={tmp_path / 'work'}", "eval.layer=7"])
    assert code == 2
    assert f"eval.layer = 7: must be in 1..3: {good} has 3 encoder layers" in capsys.readouterr().err


@pytest.mark.reliability("user-errors")
def test_debug_shows_the_traceback(tmp_path):
    from pipelines.cli import main
    from retain_asd.models.encoders import CheckpointError

    good, truncated = _tiny_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="truncated.pt"):
        main(["--debug", "evaluate", "--preset", "smoke", "--checkpoint", str(truncated), "--out",
              str(tmp_path / "out"), f"data.work_dir={tmp_path / 'work'}"])


@pytest.mark.ray
@pytest.mark.reliability("user-errors")
def test_a_user_error_raised_in_a_ray_worker_is_one_line(ray_local, capsys):
    from pipelines.common import run_main
    from retain_asd.config import ConfigError

    @ray_local.remote
    def task():
        raise ConfigError("train.lr = inf: must be a finite number")

    assert run_main(lambda argv: ray_local.get(task.remote()), [], prog="retain-asd x") == 2
    err = capsys.readouterr().err
    assert err.startswith("retain-asd x: error: train.lr = inf: must be a finite number\n")
    assert "Traceback" not in err and ray_local.is_initialized()  # the caller's Ray is left running


@pytest.mark.reliability("evaluate-bad-checkpoint")
def test_pretrain_opens_model_checkpoint_before_ray_starts(tmp_path, capsys):
    from pipelines.cli import main

    _, truncated = _tiny_checkpoints(tmp_path)
    out = tmp_path / "run"
    code = main(["pretrain", "--preset", "smoke", "--out", str(out), f"model.checkpoint={truncated}"])
    assert code == 2
    assert f"{truncated}: not a readable torch checkpoint" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.reliability("user-errors")
@pytest.mark.parametrize("command", [
    ["score", "clips", "--bank", "{tmp}/missing.pt", "--clips", "{tmp}"],
    ["score", "bank", "--checkpoint", "{tmp}/missing.pt", "--normal", "{tmp}", "--out", "{tmp}/b.pt"],
    ["config", "show", "nope"],
    ["config", "show", "--preset", "smoke", "train.lr=x"],
    ["dcase-score", "--scores", "{tmp}/missing", "--ground-truth", "{tmp}/missing"],
    ["compare", "--experiment", "x", "--tracking-uri", "{tmp}/missing.db"],
])
def test_debug_gives_the_traceback_in_every_command(command, tmp_path, capsys):
    """Without --debug: one line and the hint, exit code 2; with it, the exception itself."""
    from pipelines.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and 1 <= len(err.strip().splitlines()) <= 2, err
    with pytest.raises((ValueError, OSError)):
        main([*argv, "--debug"])
    assert not (tmp_path / "missing.db").exists()


def test_config_show_takes_preset_as_an_option_too(capsys):
    from pipelines.cli import main

    assert main(["config", "show", "--preset", "smoke"]) == 0
    by_option = capsys.readouterr().out
    assert main(["config", "show", "smoke"]) == 0
    assert capsys.readouterr().out == by_option and "name: smoke" in by_option
