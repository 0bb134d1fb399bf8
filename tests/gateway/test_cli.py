"""`loragate` subcommands that run in-process: migrate, bench, argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.db import head_revision
from gateway.cli.main import main

pytestmark = pytest.mark.unit


def test_migrate_upgrade_current_and_downgrade_on_the_data_dirs_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_DATABASE_URL", raising=False)
    data_dir = str(tmp_path / "data")
    assert main(["migrate", "current", "--data-dir", data_dir]) == 0
    assert capsys.readouterr().out.strip() == "(empty database)"
    assert main(["migrate", "upgrade", "--data-dir", data_dir]) == 0
    assert (tmp_path / "data" / "catalog.db").is_file()
    capsys.readouterr()
    assert main(["migrate", "current", "--data-dir", data_dir]) == 0
    assert capsys.readouterr().out.strip() == head_revision()
    assert main(["migrate", "downgrade", "base", "--data-dir", data_dir]) == 0
    assert main(["migrate", "current", "--data-dir", data_dir]) == 0
    assert capsys.readouterr().out.strip() == "(empty database)"
    with pytest.raises(SystemExit, match="needs a revision"):
        main(["migrate", "downgrade", "--data-dir", data_dir])


def test_bench_runs_only_scripts_of_the_bench_dir() -> None:
    with pytest.raises(SystemExit, match="no benchmark"):
        main(["bench", "../gateway/cli"])


def test_bad_environment_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAGATE_PORT", "not-a-port")
    assert main(["admin", "tenant-list"]) == 2
    assert "LORAGATE_PORT" in capsys.readouterr().err


def test_admin_without_a_token_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    assert main(["admin", "--url", "http://127.0.0.1:9", "tenant-list"]) == 2
    assert "LORAGATE_ADMIN_TOKEN" in capsys.readouterr().err
