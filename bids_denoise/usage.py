"""The command-line reference, docs/options.md, generated from the parser.

The page is written from the same :func:`argparse.ArgumentParser` the app parses its command line
with (``build_parser(load_all())``), so every option a method declares in its registry entry appears
with its default, choices and help, and nothing is copied by hand::

    python -m bids_denoise.usage docs/options.md            # (re)write the page
    python -m bids_denoise.usage --check docs/options.md    # exit 1 if the page is stale

``make docs`` runs the first; ``tests/test_docs.py`` fails when the page is stale. The output
depends on the parser alone: a default that depends on the machine (``--nprocs``, ``--omp-nthreads``: its CPUs) or
on where the app is installed (an absolute path) is written in words.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REGENERATE = "python -m bids_denoise.usage docs/options.md (or make docs)"

#: defaults that depend on the machine the parser was built on, by destination, written in words
MACHINE_DEFAULTS = {"nprocs": "the CPUs this process may use", "omp_nthreads": "those CPUs, at most 8"}

#: how a value's type is written where the option has no choices and no metavar
_TYPE_WORDS = {
    "int": "INT",
    "float": "NUMBER",
    "str": "TEXT",
    "Path": "PATH",
    "boolean": "`true` \\| `false`",
    "integers": "INT or X,Y,Z",
    "integer_list": "INT[,INT]",
}

_HEADER = """\
# Command-line options

<!-- Generated from the parser by `{regenerate}`: do not edit by hand. -->

This page is generated from the app's command-line parser, with every method's options taken from
its registry entry (`bids_denoise/registry/`); `bids-denoise --help` prints the same. How to use
them: [usage](usage.md); what each method does: [methods](methods.md).

```
bids-denoise BIDS_DIR OUTPUT_DIR {{participant,group}} [options]
```

A method's options (`--<method>-<parameter>`) apply only where the method runs (`--methods`, or
`--super-resolution` for an upsampler). Values are checked before anything runs: a value an option
refuses is a usage error (exit 64).
"""


def render_options(parser: argparse.ArgumentParser) -> str:
    """docs/options.md for ``parser``: one section per option group, one table row per option."""
    lines = [_HEADER.format(regenerate=REGENERATE)]
    # argparse has no public API for its groups; this is how sphinx-argparse reads them too
    for group in parser._action_groups:
        actions = list(group._group_actions)
        if not actions:
            continue
        heading, description = _split_title(group.title or "")
        lines.append(f"## {heading}\n")
        for text in (description, group.description):
            if text:
                lines.append(f"{_sentence(text)}\n")
        lines.append("| option | value | default | description |")
        lines.append("|---|---|---|---|")
        for action in actions:
            lines.append("| " + " | ".join((_names(action), _value(action), _default(action),
                                              _cell(_help(parser, action)))) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _split_title(title: str) -> tuple[str, str]:
    """``"mppca options (MP-PCA: ...)"`` -> (``"mppca options"``, ``"MP-PCA: ..."``)."""
    head, sep, rest = title.partition(" (")
    if sep and rest.endswith(")") and head.endswith(" options") and " " not in head[: -len(" options")]:
        return f"`{head[: -len(' options')]}` options", rest[:-1]
    names = {"positional arguments": "Positional arguments", "options": "General options"}
    return names.get(title, title), ""


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def _names(action: argparse.Action) -> str:
    if not action.option_strings:  # a positional argument
        return f"`{action.metavar or action.dest}`"
    return ", ".join(f"`{name}`" for name in action.option_strings)


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "(flag)"
    if action.choices is not None:
        value = " \\| ".join(f"`{choice}`" for choice in action.choices)
    elif action.metavar is not None:
        value = f"`{action.metavar}`"
    elif action.type is not None:
        name = getattr(action.type, "__name__", type(action.type).__name__)
        value = _type_words(name)
    else:
        value = "TEXT"
    if action.nargs in ("+", "*"):
        value += " ..." if action.nargs == "+" else " ... (or none)"
    return value


def _type_words(name: str) -> str:
    """``int`` -> ``INT``; ``auto or int`` -> ```auto` or INT``; an unknown parser by its name in words."""
    if name.startswith("auto or "):
        return "`auto` or " + _type_words(name[len("auto or "):])
    return _TYPE_WORDS.get(name, name.replace("_", " "))


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is argparse.SUPPRESS or not action.option_strings:
        return ""
    if action.dest in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[action.dest]
    if action.nargs == 0:
        return "on" if default else "off"
    if default is None:
        return "none"
    return f"`{_text(default)}`"


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return _path_text(value)
    if isinstance(value, (list, tuple)):
        separator = "," if all(isinstance(item, (int, float)) for item in value) else " "
        return separator.join(_text(item) for item in value)
    return str(value)


def _path_text(path: Path) -> str:
    """A relative path as ``./path``; an absolute one relative to the current directory or the home
    folder where it lies under them, else by its name only (the build machine's folders are not the
    reader's)."""
    if not path.is_absolute():
        return f"./{path.as_posix()}"
    for base, prefix in ((Path.cwd(), "."), (Path.home(), "~")):
        try:
            return f"{prefix}/{path.relative_to(base).as_posix()}"
        except ValueError:
            continue
    return f".../{path.name}"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if action.help is argparse.SUPPRESS:
        return ""
    if "%(" in text:  # argparse's own expansion (%(default)s, %(prog)s ...)
        values = {name: value for name, value in vars(action).items() if value is not argparse.SUPPRESS}
        values.update(prog=parser.prog, default=_default(action).strip("`"))
        text = text % values
    return " ".join(text.split())


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipes, emphasis or HTML from the help's characters)."""
    for character, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;")):
        text = text.replace(character, escaped)
    return text


def build() -> argparse.ArgumentParser:
    """The app's parser, with every registered method's options."""
    from bids_denoise.cli import build_parser
    from bids_denoise.registry import load_all

    return build_parser(load_all())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bids_denoise.usage",
                                     description="Write the command-line reference (docs/options.md).")
    parser.add_argument("output", type=Path, nargs="?", default=Path("docs/options.md"),
                        help="the page to write (default docs/options.md)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the page differs from what the parser gives")
    args = parser.parse_args(argv)
    page = render_options(build())
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != page:
            print(f"{args.output} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    from bids_denoise.io import atomic_path

    with atomic_path(args.output) as partial:
        partial.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
