"""The settings layer: one declaration gives the flag, its check, the saved JSON and --config."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.train.config import SAVED_SETTINGS
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
    return parse(Program, argv, prog="prog", description="a program", others=SAVED_SETTINGS, **kw)[0]


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
    (tmp_path / "c.json").write_text(json.dumps({"load": 0.5, "lr": 0.1, "epochs": 3}))
    assert run(["--config", str(tmp_path / "c.json")]).load == 0.5
    assert "settings of run.py, left out: epochs, lr" in capsys.readouterr().out


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
    assert 'c.json: flip: "yes" is not a bool' in fails(["--config", str(tmp_path / "c.json")], capsys)
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


@pytest.mark.parametrize(
    "saved, says",
    [
        ({"batch_size": None}, "batch_size: null is not an integer"),
        ({"batch_size": 1e999}, "batch_size: Infinity is not an integer"),  # what json reads 1e999 as
        ({"batch_size": 16.9}, "batch_size: 16.9 is not an integer"),  # not silently 16
        ({"batch_size": "16"}, 'batch_size: "16" is not an integer'),
        ({"towers": "dense"}, 'towers: "dense" is not a list: write ["dense"]'),
        ({"out": ""}, "out: an empty path"),
        ({"batch_sise": 3}, "batch_sise: a setting of no program; did you mean batch_size?"),
        ([1, 2], "holds no settings object"),
    ],
)
def test_bad_values_in_a_config_file_are_one_line(saved, says, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(saved))
    assert says in fails(["--config", str(tmp_path / "c.json")], capsys)


def test_empty_or_damaged_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("")
    assert "config.json: cannot read it" in fails(["--config", str(tmp_path / "config.json")], capsys)
    (tmp_path / "config.json").write_text('{"batch_size": 1')  # cut short by a full disk
    assert "config.json: cannot read it" in fails(["--config", str(tmp_path / "config.json")], capsys)


def test_integral_numbers_and_null_for_optional_settings_are_taken(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 16.0, "load": 1, "note": None}))
    cfg = run(["--config", str(tmp_path / "c.json")])
    assert (cfg.batch_size, cfg.load, cfg.note) == (16, 1.0, None) and type(cfg.batch_size) is int


def test_an_empty_path_is_refused_on_the_command_line(capsys):
    assert "argument --out: an empty path (for the current folder, pass .)" in fails(["--out", ""], capsys)


# Programs whose settings are parsed in-process (nothing before the settings is written, nothing is started).
def parse_run(argv):
    import run as program

    return program.parse(argv)


def parse_bench(argv):
    from tools.bench_io import parse_args

    return parse_args(["--shards", "s", *argv])


def parse_shard(argv):
    from tools.shard_imagenet import parse_config

    return parse_config(["--src", str(ROOT), "--out", "/nonexistent/out", *argv])


def parse_demo(argv):
    from tools.make_demo_data import parse_config

    return parse_config(["--out", "/nonexistent/demo", *argv])


PROGRAMS = {"run": parse_run, "bench_io": parse_bench, "shard_imagenet": parse_shard, "make_demo_data": parse_demo}


def refused(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("seed", ["-1", str(2**64), "99999999999999999999999"])
def test_every_program_refuses_a_seed_out_of_range_in_one_line(program, seed, capsys):
    assert f"--seed {seed}: must be between 0 and {2**63 - 1}" in refused(PROGRAMS[program], ["--seed", seed], capsys)


def test_the_largest_seed_is_one_every_consumer_takes():
    """torch takes seeds below 2**64 and a run seeds each rank with seed + rank; numpy's generators take any."""
    import numpy as np
    import torch

    from pipeline.settings import SEED
    from pipeline.sharding import dali_seeds

    top = 2**63 - 1
    assert SEED[0](top) and not SEED[0](top + 1) and not SEED[0](-1)
    torch.manual_seed(top + 4096)
    torch.Generator().manual_seed(top)
    np.random.default_rng([top, 7])
    assert all(0 <= s < 2**31 for s in dali_seeds(top, 4095))


@pytest.mark.parametrize(
    "argv", [["--lr", "inf"], ["--weight-decay", "1e400"], ["--warmup-epochs", "inf"], ["--checkpoint-minutes", "nan"]]
)
def test_a_run_refuses_numbers_that_are_not_finite(argv, capsys):
    assert f"{argv[0]} {float(argv[1])}: must be a finite number" in refused(parse_run, argv, capsys)


@pytest.mark.parametrize("program", ["run", "bench_io"])
def test_prefetch_is_bounded(program, capsys):
    assert "--prefetch 100000: must be between 1 and 32" in refused(PROGRAMS[program], ["--prefetch", "100000"], capsys)


def test_splits_must_name_at_least_one_folder(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"splits": []}))
    assert "--splits (none): must be one or more folder names" in refused(
        parse_shard, ["--config", str(tmp_path / "c.json")], capsys
    )
    (tmp_path / "c.json").write_text(json.dumps({"splits": "train"}))
    assert 'splits: "train" is not a list: write ["train"]' in refused(
        parse_shard, ["--config", str(tmp_path / "c.json")], capsys
    )


def test_a_runs_config_sets_the_loader_of_bench_io_but_not_the_seed_of_the_sharder(tmp_path, capsys):
    from model.train.config import Config

    saved = to_json(Config(batch_size=32, seed=7, shards="shards", lr=0.02))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = parse_bench(["--config", str(tmp_path / "config.json")])
    assert (cfg.batch_size, cfg.seed) == (32, 7)  # the same sections: they read the same in both programs
    assert "settings of run.py, left out: " in capsys.readouterr().out
    cfg = parse_shard(["--config", str(tmp_path / "config.json")])
    assert cfg.seed == 0  # the sharder's seed orders the shards; a run's seeds its training
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "settings of run.py, left out: " in note and "seed" in note


def test_a_manifest_given_as_config_is_one_short_line(demo_shards, capsys):
    err = refused(parse_bench, ["--config", str(demo_shards / "manifest.json")], capsys)
    assert "settings of no program" in err and len(err) - len(str(demo_shards)) < 200


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_refuses_a_typo_and_leaves_out_a_runs_settings(program, tmp_path, capsys):
    """A key of no program is a typo in every program; a key of a run's config.json is one the others leave out."""
    (tmp_path / "typo.json").write_text(json.dumps({"batch_sise": 3}))
    assert "batch_sise: a setting of no program" in refused(
        PROGRAMS[program], ["--config", str(tmp_path / "typo.json")], capsys
    )
    (tmp_path / "run.json").write_text(json.dumps({"lr": 0.1}))
    PROGRAMS[program](["--config", str(tmp_path / "run.json")])
    assert ("settings of run.py, left out: lr" in capsys.readouterr().out) == (program != "run")
