"""A method's options, declared once: one frozen dataclass per method.

Each field of a method's options class is made with :func:`option`: its default (the function's,
which is the peer's behaviour where the method has a peer), a help sentence, its allowed values
and how a text value is read (``parse``). The method's function takes the class; the app's
registration (``bids_denoise/registry/<method>.py``) derives its command-line options, their
validation and the provenance from the same fields (``bids_denoise.contract.params_from``), so a
parameter is named, typed and described in one place.

The parsers here read text (a command line, a configuration file) and raise ``ValueError`` with a
sentence saying what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def option(default: Any, help: str, *, choices: tuple | None = None, parse: Callable | None = None,
           app: bool = True):
    """A field of an options dataclass.

    Parameters
    ----------
    default
        The function's default (immutable: a tuple, not a list).
    help : str
        One sentence, shown by ``--help`` and in the options page.
    choices : tuple, optional
        The allowed values.
    parse : callable, optional
        Reads a text value (default: from the default's type: ``bool`` by :func:`boolean`, ``int``,
        ``float``, ``str``).
    app : bool
        Offered by the app (False: a function-only setting such as the solver).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "parse": parse,
                                                        "app": app})


class Options:
    """Base of the options dataclasses: values checked against their choices when made; ``replace``."""

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            choices = spec.metadata.get("choices")
            value = getattr(self, spec.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{spec.name} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        self.check()

    def check(self) -> None:
        """Checks of values that the choices do not express (override)."""

    def replace(self, **changes):
        """A copy with ``changes`` (unknown names are a ``TypeError`` that names them)."""
        unknown = sorted(set(changes) - {spec.name for spec in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def choices_of(cls, name: str) -> tuple:
        """The allowed values of option ``name`` (an empty tuple where any value of its type goes)."""
        return tuple(cls.__dataclass_fields__[name].metadata.get("choices") or ())

    @classmethod
    def from_values(cls, values: dict):
        """The options from a dict that may hold other keys too (an app's parameters)."""
        names = {spec.name for spec in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def as_dict(self) -> dict:
        return {spec.name: _plain(getattr(self, spec.name)) for spec in dataclasses.fields(self)}


def resolve_options(cls, options=None, changes=None):
    """``options`` (an instance of ``cls``, or None for its defaults) with keyword ``changes``."""
    options = cls() if options is None else options
    if not isinstance(options, cls):
        raise TypeError(f"options must be {cls.__name__}, got {type(options).__name__}")
    return options.replace(**changes) if changes else options


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------------------
# Parsers of text values


def boolean(text) -> bool:
    """``true``/``false`` (also yes/no, 1/0, on/off)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def integers(minimum: int | None = None, *, allow_auto: bool = False) -> Callable:
    """One integer or three (``5`` or ``5,3,1``), each at least ``minimum``; optionally ``auto`` (None)."""

    def parse(text):
        if allow_auto and str(text).strip() in ("auto", ""):
            return None
        try:
            values = [int(part) for part in str(text).replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"expected one integer or three ('x,y,z'), got {text!r}") from None
        if len(values) not in (1, 3):
            raise ValueError(f"expected one integer or three ('x,y,z'), got {text!r}")
        if minimum is not None and min(values) < minimum:
            raise ValueError(f"each value must be at least {minimum}, got {text!r}")
        return values[0] if len(values) == 1 else tuple(values)

    parse.__name__ = "integers"
    return parse


def integer_list(text) -> tuple:
    """A list of integers (``2`` or ``0,2``)."""
    try:
        return tuple(int(part) for part in str(text).replace(",", " ").split())
    except ValueError:
        raise ValueError(f"expected integers such as '2' or '0,2', got {text!r}") from None


def auto_or(parse: Callable) -> Callable:
    """``auto``, or a value ``parse`` takes."""

    def parse_auto(text):
        return "auto" if str(text).strip() == "auto" else parse(text)

    parse_auto.__name__ = f"auto or {getattr(parse, '__name__', 'value')}"
    return parse_auto


def positive(parse: Callable) -> Callable:
    """A finite number ``parse`` takes, above zero."""

    def parse_positive(text):
        value = parse(text)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"must be a finite number above zero, got {text!r}")
        return value

    parse_positive.__name__ = getattr(parse, "__name__", "number")
    return parse_positive


def number(text) -> float:
    """A finite number."""
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number, got {text!r}")
    return value


def default_parser(default) -> Callable:
    """How a field is read when its declaration gives no parser: from its default's type."""
    if isinstance(default, bool):
        return boolean
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return number
    return str
