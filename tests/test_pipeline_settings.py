"""The settings layer: one declaration gives the flag, its check, the saved JSON and --config."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.settings import at_least, between, option, parse, show, to_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Loader:
    """Loader"""

    batch_size: int = option(128, "images per step", check=at_least(1))
    load: float = option(0.65, "a share", check=between(0.0, 1.0))
    flip: bool = option(True, "mirror half the images")


@dataclass
class Program(Loader):
    """Program"""

    out: Path = option(Path("runs"), "where to write")
    mode: str = option("off", "how", choices=("off", "default", "max"), const="default")
    towers: tuple[str, ...] = option(("dense",), "tower convs")
    size: tuple[int, int] = option((3, 4), "MIN MAX")
    note: str | None = option(None, "free text")


def run(argv, **kw):
    return parse(Program, argv, prog="prog", description="a program", **kw)[0]


def fails(argv, capsys, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        run(argv, **kw)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def test_defaults_flags_and_types():
    assert run([]) == Program()
    cfg = run(["--batch-size", "7", "--no-flip", "--out", "x", "--mode", "--towers", "a", "b", "--size", "5", "6"])
    assert cfg == Program(batch_size=7, flip=False, out=Path("x"), mode="default", towers=("a", "b"), size=(5, 6))
    assert run(["--mode", "max"]).mode == "max"


def test_precedence_default_preset_config_flag(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batch_size": 5, "load": 0.5}))
    preset = lambda given: {"batch_size": 3, "load": 0.1, "mode": "max"}  # noqa: E731
    cfg = run(["--config", str(config), "--load", "0.25"], preset=preset)
    assert (cfg.batch_size, cfg.load, cfg.mode) == (5, 0.25, "max")


def test_saved_settings_rerun_the_same(tmp_path):
    cfg = run(["--batch-size", "9", "--no-flip", "--towers", "a", "b", "--size", "1", "2", "--note", "hi"])
    (tmp_path / "config.json").write_text(json.dumps(to_json(cfg)))
    assert run(["--config", str(tmp_path / "config.json")]) == cfg
    assert run(["--config", str(tmp_path / "config.json"), "--flip"]).flip is True


def test_other_programs_settings_are_named_and_left_out(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 4, "lr": 0.1, "epochs": 3}))
    assert run(["--config", str(tmp_path / "c.json")]).batch_size == 4
    assert "left out: epochs, lr" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--load", "1.5"], "--load 1.5: must be between 0.0 and 1.0"),
        (["--mode", "fast"], "invalid choice: 'fast'"),
        (["--batch-size", "x"], "invalid int value: 'x'"),
    ],
)
def test_bad_values_are_one_line(argv, says, capsys):
    assert says in fails(argv, capsys)


def test_bad_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"batch_size": "many"}))
    (tmp_path / "c.json").write_text(json.dumps({"flip": "yes"}))
    (tmp_path / "d.json").write_text(json.dumps({"mode": "fast"}))
    assert "a.json: cannot read it" in fails(["--config", str(tmp_path / "a.json")], capsys)
    assert "b.json: batch_size:" in fails(["--config", str(tmp_path / "b.json")], capsys)
    assert "c.json: flip: 'yes' is not a bool" in fails(["--config", str(tmp_path / "c.json")], capsys)
    assert "--mode fast: choose from off, default, max" in fails(["--config", str(tmp_path / "d.json")], capsys)
    assert "--config" in fails(["--config", str(tmp_path / "missing.json")], capsys)


def test_show_prints_every_setting():
    lines = show(run(["--towers", "a", "b"])).splitlines()
    assert lines[0] == "config:" and len(lines) == 1 + 8 and "  towers             a b" in lines


def test_help_groups_sections_and_shows_defaults():
    out = subprocess.run(
        [sys.executable, "tools/make_demo_data.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "The synthetic set:" in out and "(default: 94)" in out and "(required)" in out


def test_make_demo_data_refuses_bad_values_before_writing(tmp_path):
    r = subprocess.run(
        [sys.executable, "tools/make_demo_data.py", "--out", str(tmp_path / "o"), "--size-range", "9", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--size-range 9 3" in r.stderr
    assert not (tmp_path / "o").exists()
