"""One command-line convention for every `ganrm` command and trainer script: options are generated from config
dataclasses, spelled snake_case like diffusers' training scripts and accelerate (`--num_candidates`), with the field's
default and help. The kebab-case spellings of earlier releases (`--num-candidates`, and renamed ones such as
`--epochs` for `--max_epochs`) still work for one release, with a warning naming the new spelling.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, field, fields

DEPRECATION = "{old} is deprecated and will be removed in the next release: use {new}"


def option(default: object = MISSING, help: str = "", *, aliases: Sequence[str] = (), **extra: object):  # noqa: A002
    """A dataclass field that is also a command-line option: its help, choices, `required`, and the old spellings
    (`aliases`, e.g. "--epochs") that still reach it."""
    metadata = {"help": help, "aliases": tuple(aliases), **extra}
    if default is MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class _Deprecating(argparse.Action):
    """Stores the value like `store`, and warns when an old spelling was used."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        _warn_if_old(self, option_string)
        setattr(namespace, self.dest, values)


class _DeprecatingFlag(argparse.Action):
    """`store_true` that warns when an old spelling was used."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):  # noqa: A002, ANN001
        super().__init__(option_strings, dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        _warn_if_old(self, option_string)
        setattr(namespace, self.dest, True)


class _DeprecatingBoolean(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        _warn_if_old(self, option_string)
        super().__call__(parser, namespace, values, option_string)


def _warn_if_old(action: argparse.Action, option_string: str | None) -> None:
    canonical = action.option_strings[0]
    if option_string is None or option_string == canonical:
        return
    if option_string.startswith("--no") and isinstance(action, argparse.BooleanOptionalAction):
        new = "--no-" + canonical[2:]
        if option_string == new:
            return
    else:
        new = canonical
    print("warning: " + DEPRECATION.format(old=option_string, new=new), file=sys.stderr)


def spellings(name: str, aliases: Sequence[str] = ()) -> list[str]:
    """`--name` first (snake_case), then the kebab-case spelling and any old aliases."""
    names = [f"--{name}"]
    kebab = f"--{name.replace('_', '-')}"
    for alias in (kebab, *aliases):
        if alias not in names:
            names.append(alias)
    return names


def add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    *,
    aliases: Sequence[str] = (),
    flag: bool = False,
    **kwargs: object,
) -> argparse.Action:
    """An option outside any config dataclass, under the same convention (`flag`: a store_true switch)."""
    if flag:
        return parser.add_argument(*spellings(name, aliases), action=_DeprecatingFlag, dest=name, **kwargs)
    return parser.add_argument(*spellings(name, aliases), action=_Deprecating, dest=name, **kwargs)


def argument_type(annotation: object) -> type:
    """The scalar type of `int`, `float | None`, `tuple[int, ...]` ... (None allowed through the default)."""
    arguments = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return arguments[0] if arguments else annotation


def none_or(kind: Callable[[str], object]) -> Callable[[str], object]:
    """A parser that reads 'none' (or nothing) as None and anything else with `kind`."""

    def parse(text: str) -> object:
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return parse


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers, e.g. `512,128`."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    *,
    exclude: Sequence[str] = (),
    prefix: str = "",
) -> None:
    """One option per field of `config_class` (`--{prefix}{field}`), with its default and help; booleans as
    --x/--no-x; `tuple[int, ...]` fields as comma-separated integers."""
    hints = typing.get_type_hints(config_class)
    defaults = (
        config_class()
        if all(item.default is not MISSING or item.default_factory is not MISSING for item in fields(config_class))
        else None
    )
    for item in fields(config_class):
        if item.name in exclude or item.name.startswith("_"):
            continue
        name = prefix + item.name
        aliases = item.metadata.get("aliases", ())
        help_text = item.metadata.get("help", "")
        extra = {"choices": item.metadata["choices"]} if "choices" in item.metadata else {}
        annotation = hints[item.name]
        kind = argument_type(annotation)
        if typing.get_origin(annotation) is tuple or typing.get_origin(kind) is tuple:
            kind = int_list
        default = getattr(defaults, item.name) if defaults is not None else None
        if item.metadata.get("required"):
            add_option(parser, name, aliases=aliases, type=kind, required=True, help=help_text, **extra)
        elif kind is bool:
            parser.add_argument(
                *spellings(name, aliases), dest=name, action=_DeprecatingBoolean, default=default, help=help_text
            )
        else:
            shown = "" if default is None else f" (default: {_shown(default)})"
            add_option(
                parser, name, aliases=aliases, type=none_or(kind), default=default, help=help_text + shown, **extra
            )


def _shown(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_from_args(config_class: type, args: argparse.Namespace, *, prefix: str = "", **overrides: object):
    """The config whose fields the parsed `args` hold (fields without an option keep their default)."""
    values = {
        item.name: getattr(args, prefix + item.name)
        for item in fields(config_class)
        if hasattr(args, prefix + item.name)
    }
    return config_class(**{**values, **overrides})


class CanonicalHelpFormatter(argparse.HelpFormatter):
    """Help that names each option by its snake_case spelling only (the old spellings still parse)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not _has_old_spellings(action):
            return super()._format_action_invocation(action)
        canonical = action.option_strings[0]
        if action.nargs == 0:
            return canonical
        return f"{canonical} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _format_usage(self, usage, actions, groups, prefix):  # noqa: ANN001 - argparse's signature
        shown = []
        for action in actions:
            if _has_old_spellings(action):
                action = argparse.Action(
                    [action.option_strings[0]],
                    action.dest,
                    nargs=action.nargs,
                    required=action.required,
                    metavar=action.metavar,
                    choices=action.choices,
                    help=action.help,
                )
            shown.append(action)
        return super()._format_usage(usage, shown, groups, prefix)


def _has_old_spellings(action: argparse.Action) -> bool:
    return isinstance(action, (_Deprecating, _DeprecatingFlag)) and len(action.option_strings) > 1


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose help follows the convention of this module."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", CanonicalHelpFormatter)
        kwargs.setdefault(
            "epilog", "Options are snake_case; the kebab-case spellings of earlier releases still work for one release."
        )
        super().__init__(*args, **kwargs)
