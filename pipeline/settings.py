"""Settings declared once: a dataclass field carries its help, choices and check, and that one declaration builds
the command line, validates what it is given, prints it and is saved as JSON that --config reads back.

Programs compose their settings from shared sections by inheritance (class RunConfig(LoaderSettings, ...)), so a
setting two programs take is declared in one place and reads the same in both. argparse and dataclasses do all this
in a page; a library (tyro, jsonargparse) would bring dependencies and its own error format, and ours is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
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
) -> Any:
    """A setting: its default, help, the values it may take (choices, or check: (predicate, what it must be)).
    `const` is the value of the bare flag, for a flag whose value may be left out (--compile)."""
    meta = {"help": help, "choices": choices, "check": check, "const": const}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f"at least {n}"


def above(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > n), f"above {n}"


def between(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: low <= v <= high), f"between {low} and {high}"


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
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _convert(kind, value):
    """A JSON value as the declared type: lists back to tuples, strings to paths; ValueError if it is not one."""
    kind = _unwrap(kind)
    if value is None:
        return None
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        if not isinstance(value, list) or len(kinds) != len(value):
            raise ValueError(f"{value!r} is not a list of {len(kinds)}")
        return tuple(_convert(k, v) for k, v in zip(kinds, value))
    if kind is bool or isinstance(value, bool):
        if kind is not bool or not isinstance(value, bool):
            raise ValueError(f"{value!r} is not a {kind.__name__}")
        return value
    return kind(value)


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
                group.add_argument(flag(f.name), type=kind, choices=meta.get("choices"), metavar=metavar, **extra, **kw)
    return p


def read_config(path: Path, cls, parser: Parser) -> dict:
    """The settings `cls` takes from a saved JSON file; the ones it does not take are named on one line."""
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
    other = sorted(set(saved) - known)
    if other:
        print(f"{parser.prog}: --config {path}: not settings of this program, left out: {', '.join(other)}")
    out = {}
    for k in sorted(set(saved) & known):
        try:
            out[k] = _convert(hints[k], saved[k])
        except (TypeError, ValueError) as e:
            parser.error(f"--config {path}: {k}: {e}; correct the file or pass {flag(k)}")
    return out


def refused(cfg) -> tuple[str, Any, str] | None:
    """The first value its declaration refuses: (name, value, what it must be); None if every value passes."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        each = value if isinstance(value, tuple) else (value,)
        if meta.get("choices") and (not each or any(v not in meta["choices"] for v in each)):
            return f.name, value, f"choose from {', '.join(map(str, meta['choices']))}"
        if meta.get("check") and value is not None and not meta["check"][0](value):
            return f.name, value, f"must be {meta['check'][1]}"
    return None


def validate(cfg, parser: Parser) -> None:
    """Each value against its declaration: one line naming the flag and what it must be."""
    if bad := refused(cfg):
        name, value, must = bad
        parser.error(f"{flag(name)} {_shown(value)}: {must}")


def parse(cls, argv=None, *, prog: str, description: str, preset: Callable[[dict], dict] | None = None):
    """Settings from, lowest first: the declared defaults, `preset` (given what was named), --config, the flags."""
    parser = build_parser(cls, prog, description)
    given = vars(parser.parse_args(argv))
    config = given.pop("config", None)
    hints = typing.get_type_hints(cls)
    given = {k: _convert(hints[k], list(v) if isinstance(v, (list, tuple)) else v) for k, v in given.items()}
    values = {**(read_config(config, cls, parser) if config else {}), **given}
    if preset:
        values = {**preset(values), **values}
    missing = [
        flag(f.name) for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        parser.error(f"{' and '.join(missing)} required")
    cfg = cls(**values)
    validate(cfg, parser)
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
        0, "DALI CPU threads per process; 0: the node's cores shared by its processes", check=at_least(0)
    )
    hw_decoder_load: float = option(
        0.65,
        "share of the JPEGs for the GPU's hardware decoder, the rest on the SMs (docs/perf.md)",
        check=between(0.0, 1.0),
    )
    prefetch: int = option(2, "batches DALI prepares ahead", check=at_least(1))

    @classmethod
    def of(cls, cfg: LoaderSettings) -> LoaderSettings:
        """A checked copy of the loader's settings in `cfg` (a composed config such as the run's): ValueError naming
        the setting if its declaration refuses a value. The copy is the loader's own: later edits to `cfg` miss it."""
        own = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
        if bad := refused(own):
            name, value, must = bad
            raise ValueError(f"LoaderSettings {name}={value!r}: {must}")
        return own
