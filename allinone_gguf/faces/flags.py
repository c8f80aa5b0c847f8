"""Command-line flags derived from frozen dataclasses, so each default and its help text is written once.

    >>> import argparse
    >>> from allinone_gguf.faces.flags import add_settings_arguments, overrides
    >>> p = argparse.ArgumentParser()
    >>> add_settings_arguments(p, ["n_ctx", "labels"])
    >>> overrides(p.parse_args(["--n-ctx", "1024"]), ["n_ctx", "labels"])
    {'n_ctx': 1024}

Every flag's argparse default is None, so only the flags a user gives override the dataclass:
`Settings(**overrides(args, names))` (or `AllInOne(path, **overrides(args, names))`) keeps the dataclass's
defaults for the rest. The CLI, `make bench`, the accuracy script and the app all build their flags here.
Nothing here loads llama.cpp, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Callable, Iterable

from ..runtime.config import LABEL_LANGUAGES, Settings


def settings_choices(name: str) -> list[str] | None:
    """The allowed values of a Settings field, for the fields that have a fixed set."""
    if name == "labels":
        return list(LABEL_LANGUAGES)
    if name == "sentiment_prompt":
        from ..runtime.prompts import SENTIMENT_PROMPTS
        return sorted(SENTIMENT_PROMPTS)
    return None


def _shown(name: str, default: object) -> object:
    return "random" if default is None and name == "seed" else default


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, names: Iterable[str] | None = None,
                            title: str | None = None,
                            choices: Callable[[str], list[str] | None] = lambda name: None) -> None:
    """One `--flag-name` per field of the frozen dataclass `cls` (all fields when `names` is None), typed from
    the field's annotation, with the field's `help` metadata and its default shown. Fields `cls` does not have
    are skipped, so a field the runtime dropped simply has no flag."""
    defaults, hints = cls(), typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    group = parser.add_argument_group(title) if title else parser
    for name in (fields if names is None else names):
        if name not in fields:
            continue
        kind = next((a for a in typing.get_args(hints[name]) if a is not type(None)), hints[name])
        help_text = f"{fields[name].metadata.get('help', '')} (default: {_shown(name, getattr(defaults, name))})"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        allowed = choices(name)
        group.add_argument(flag, dest=name, type=kind, choices=allowed, default=None,
                           metavar=None if allowed else name.upper(), help=help_text)


def add_settings_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Flags for some fields of the runtime's Settings."""
    add_dataclass_arguments(parser, Settings, names,
                            "model settings (defaults from allinone_gguf.runtime.config.Settings)", settings_choices)


def overrides(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """{field: value} of the flags the user gave among `names`."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
