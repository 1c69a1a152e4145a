"""Settings declared once: a dataclass field carries its help, choices and check, and that one declaration builds
the command line, validates what it is given, prints it and is saved as JSON that --config reads back.

Programs compose their settings from shared sections by inheritance (class RunConfig(LoaderSettings, ...)), so a
setting two programs take is declared in one place and reads the same in both. argparse and dataclasses do all this
in a page; a library (tyro, jsonargparse) would bring dependencies and its own error format, and ours is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
    const: Any = None,
    default_factory: Callable[[], Any] | None = None,
    shared: bool = True,
    resumable: bool = False,
    saved: bool = True,
) -> Any:
    """A setting: its default, help, the values it may take (choices, or check: (predicate, what it must be)).
    `const` is the value of the bare flag, for a flag whose value may be left out (--compile). shared=False: another
    program's setting of the same name means something else (the sharder's seed is not a run's), so another program's
    saved settings do not set it. `resumable`: a continued run may change it; `saved=False`: a switch of one
    invocation, left out of the saved settings."""
    meta = {
        "help": help,
        "choices": choices,
        "check": check,
        "const": const,
        "shared": shared,
        "resumable": resumable,
        "saved": saved,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f"at least {n}"


def above(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > n), f"above {n}"


def between(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: low <= v <= high), f"between {low} and {high}"


# torch.manual_seed takes seeds below 2**64, and a run adds its rank to its seed: every program's seed is one of these.
SEED = between(0, 2**63 - 1)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the program and --help, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see python {self.prog} --help)\n")


def sections(cls) -> list[tuple[type, list[dataclasses.Field]]]:
    """The dataclasses `cls` is composed of, itself first, each with the fields it declares itself."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for base in cls.__mro__:
        own = [by_name[n] for n in inspect.get_annotations(base) if n in by_name]
        if dataclasses.is_dataclass(base) and own:
            out.append((base, own))
    return out


def _unwrap(kind) -> Any:
    """`X | None` -> X: an optional setting is given on the command line as X."""
    if _optional(kind):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _optional(kind) -> bool:
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    return union and type(None) in typing.get_args(kind)


def _convert(kind, value):
    """A JSON value as the declared type: lists back to tuples, strings to paths; ValueError if it is not one. Nothing
    is rounded or coerced: 16.9 is no integer, "16" no number, null only where the setting may be left unset."""
    if value is None:
        if not _optional(kind):
            raise ValueError(f"null is not {_name(kind)}")
        return None
    kind = _unwrap(kind)
    if typing.get_origin(kind) is tuple:
        args, many = typing.get_args(kind), typing.get_args(kind)[-1] is Ellipsis
        if many and not isinstance(value, list):
            raise ValueError(f"{json.dumps(value)} is not a list: write [{json.dumps(value)}]")
        kinds = [args[0]] * len(value) if many else args
        if not isinstance(value, list) or len(kinds) != len(value):
            raise ValueError(f"{json.dumps(value)} is not a list of {len(kinds)}")
        return tuple(_convert(k, v) for k, v in zip(kinds, value))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and (isinstance(value, int) or (math.isfinite(value) and value.is_integer())):
        return int(value)
    if kind is float and number:
        return float(value)
    if kind in (str, Path) and isinstance(value, str):
        return _path(value) if kind is Path else value
    if kind is bool and isinstance(value, bool):
        return value
    raise ValueError(f"{json.dumps(value)} is not {_name(kind)}")


def _name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", Path: "a path", bool: "a bool"}.get(kind, str(kind))


def _path(text: str) -> Path:
    """A path setting: "" would silently mean the current folder; "." says so."""
    if not text:
        raise ValueError("an empty path (for the current folder, pass .)")
    return Path(text)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser(cls, prog: str, description: str) -> Parser:
    """The command line of a settings class: a group per section, every flag's default left unset (SUPPRESS), so
    that what the user named can be told from what came from defaults, presets or --config."""
    p = Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="JSON",
        help="take the settings saved in this JSON file (such as a training run's config.json); flags given here win",
    )
    hints = typing.get_type_hints(cls)
    for section, own in sections(cls):
        group = p.add_argument_group((section.__doc__ or section.__name__).splitlines()[0])
        for f in own:
            kind, meta = _unwrap(hints[f.name]), f.metadata
            default = _default(f)
            note = (
                " (required)"
                if default is dataclasses.MISSING
                else ""
                if default is None or default is False or default in ("", ())
                else f" (default: {_shown(default)})"
            )
            kw = {"dest": f.name, "help": meta.get("help", "") + note}
            if kind is bool:
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            elif typing.get_origin(kind) is tuple:  # --tower-convs dense grouped; --size-range 300 640
                args = typing.get_args(kind)
                many = args[-1] is Ellipsis
                group.add_argument(
                    flag(f.name),
                    nargs="+" if many else len(args),
                    type=args[0],
                    choices=meta.get("choices"),
                    metavar="N" if args[0] is int else None,
                    **kw,
                )
            else:
                extra = {"nargs": "?", "const": meta["const"]} if meta.get("const") is not None else {}
                metavar = {int: "N", float: "X", Path: "PATH"}.get(kind)
                group.add_argument(
                    flag(f.name), type=_arg_type(kind), choices=meta.get("choices"), metavar=metavar, **extra, **kw
                )
    return p


def _arg_type(kind):
    """argparse's converter: Path refuses "" (argparse names the flag and the value in its one-line error)."""
    if kind is not Path:
        return kind

    def path(text: str) -> Path:
        try:
            return _path(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return path


def shared(cls, name: str) -> bool:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("shared", True)


def read_config(path: Path, cls, parser: Parser, others: dict[str, type]) -> dict:
    """The settings `cls` takes from a saved JSON file; those of `others` (program: its settings class), the programs
    whose saved files it may be given, are named on one line and left out; any other key is refused as a typo."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        parser.error(
            f"--config {path}: cannot read it ({e.__class__.__name__}: {e}); pass a JSON file such as a "
            f"run's config.json"
        )
    if not isinstance(saved, dict):
        parser.error(f"--config {path}: holds no settings object; pass a JSON file such as a run's config.json")
    hints, known = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    foreign = set(saved) - known
    if foreign:
        others = {prog: c for prog, c in others.items() if c is not cls}
        theirs = {prog: {f.name for f in dataclasses.fields(c)} for prog, c in others.items()}
        strangers = sorted(foreign - set().union(*theirs.values()))
        if strangers:
            near = difflib.get_close_matches(strangers[0], sorted(known | set().union(*theirs.values())), 1)
            named = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
            fix = f"did you mean {near[0]}?" if near and len(strangers) == 1 else "pass a run's config.json or the like"
            parser.error(
                f"--config {path}: {named}: {'a setting' if len(strangers) == 1 else 'settings'} of no program; {fix}"
            )
        # The program the file is from: the one that takes the most of the settings this one lacks.
        prog = max(theirs, key=lambda p: len(theirs[p] & foreign))
        apart = {k for k in set(saved) & known & theirs[prog] if not (shared(cls, k) and shared(others[prog], k))}
        left = sorted(foreign | apart)
        print(f"{parser.prog}: --config {path}: settings of {prog}, left out: {', '.join(left)}")
        saved = {k: v for k, v in saved.items() if k not in apart}
    out = {}
    for k in sorted(set(saved) & known):
        try:
            out[k] = _convert(hints[k], saved[k])
        except (TypeError, ValueError) as e:
            parser.error(f"--config {path}: {k}: {e}; correct the file or pass {flag(k)}")
    return out


def refused(cfg) -> tuple[str, Any, str] | None:
    """The first value its declaration refuses: (name, value, what it must be); None if every value passes. Every
    number is finite: inf and nan (or 1e400, read as inf) would only fail later, or train on as a "diverged" run."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        each = value if isinstance(value, tuple) else (value,)
        if meta.get("choices") and (not each or any(v not in meta["choices"] for v in each)):
            return f.name, value, f"choose from {', '.join(map(str, meta['choices']))}"
        if _unwrap(hints[f.name]) is float and value is not None and not math.isfinite(value):
            return f.name, value, "must be a finite number"
        if meta.get("check") and value is not None and not meta["check"][0](value):
            return f.name, value, f"must be {meta['check'][1]}"
    return None


def validate(cfg, parser: Parser) -> None:
    """Each value against its declaration: one line naming the flag and what it must be."""
    if bad := refused(cfg):
        name, value, must = bad
        parser.error(f"{flag(name)} {_shown(value) if value != () else '(none)'}: {must}")


def parse(
    cls,
    argv=None,
    *,
    prog: str,
    description: str,
    preset: Callable[[dict], dict] | None = None,
    others: dict[str, type] | None = None,
    check: Callable[[Any], str | None] | None = None,
):
    """Settings from, lowest first: the declared defaults, `preset` (given what was named), --config, the flags.
    `others`: the settings of the programs whose saved files --config may hold (a run's config.json, ...); `check`:
    what settings valid each on its own may still refuse together (one line, or None)."""
    parser = build_parser(cls, prog, description)
    given = vars(parser.parse_args(argv))
    config = given.pop("config", None)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}  # argparse gave the types
    values = {**(read_config(config, cls, parser, others or {}) if config else {}), **given}
    if preset:
        values = {**preset(values), **values}
    missing = [
        flag(f.name) for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        parser.error(f"{' and '.join(missing)} required")
    cfg = cls(**values)
    validate(cfg, parser)
    if check and (why := check(cfg)):
        parser.error(why)
    return cfg, parser


def to_json(cfg) -> dict:
    """The settings as JSON values (paths as strings, tuples as lists): what config.json holds."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def show(cfg) -> str:
    """One setting per line, for the start of a run's log."""
    return "config:\n" + "\n".join(
        f"  {f.name:<19}{_shown(getattr(cfg, f.name))}" for _, own in sections(type(cfg)) for f in own
    )


@dataclass
class LoaderSettings:
    """The loader (tools/bench_io.py --sweep prints its fastest setting as these flags)"""

    batch_size: int = option(128, "images per step and process", check=at_least(1))  # §5
    crop_size: int = option(224, "side of the square crops the network sees", check=at_least(1))  # §3.5, §4.1
    divide_std: bool = option(False, "also divide the pixels by the per-channel std (§2 subtracts the mean only)")
    threads: int = option(
        0,
        "DALI CPU threads per process; 0: the node's cores shared by its processes",
        check=at_least(0),
        resumable=True,
    )
    hw_decoder_load: float = option(
        0.65,
        "share of the JPEGs for the GPU's hardware decoder, the rest on the SMs (docs/perf.md)",
        check=between(0.0, 1.0),
    )
    # Each batch prepared ahead holds its memory; past a few, no step is fed faster.
    prefetch: int = option(2, "batches DALI prepares ahead", check=between(1, 32), resumable=True)

    @classmethod
    def of(cls, cfg: LoaderSettings) -> LoaderSettings:
        """A checked copy of the loader's settings in `cfg` (a composed config such as the run's): ValueError naming
        the setting if its declaration refuses a value. The copy is the loader's own: later edits to `cfg` miss it."""
        own = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
        if bad := refused(own):
            name, value, must = bad
            raise ValueError(f"LoaderSettings {name}={value!r}: {must}")
        return own
