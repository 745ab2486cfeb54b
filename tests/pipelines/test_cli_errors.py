"""Entry points fail early and clearly on bad input: exit code 2 and a message naming the file and the fix."""

from __future__ import annotations

import pytest


def test_evaluate_missing_checkpoint_fails_before_any_work(tmp_path, capsys):
    from pipelines.evaluate import main

    missing = tmp_path / "BEATs_student.pt"
    code = main(["--preset", "smoke", "--checkpoint", str(missing), "--out", str(tmp_path / "out"),
                 f"data.work_dir={tmp_path / 'work'}"])
    assert code == 2
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "work" / "evalsets").exists()  # the eval sets were not built first


def test_evaluate_frozen_with_missing_model_checkpoint(tmp_path, capsys):
    from pipelines.evaluate import main

    code = main(["--preset", "frozen", "--checkpoint", "frozen", "--out", str(tmp_path / "out"),
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
