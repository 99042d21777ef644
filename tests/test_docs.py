"""The documentation stays true: the generated options page is current, links resolve, the README is
short, every registered method is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bids_denoise import usage
from bids_denoise.registry import load_all

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTIONS = DOCS / "options.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_PATH = re.compile(r"`((?:bids_denoise|tests|benchmarks|scripts|docs|\.ci)/[^`\s]*)`")


def _prose(path: Path) -> str:
    """The page without its fenced code blocks (a '# comment' there is no heading, a path no link)."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(path), re.MULTILINE):
        slug = _slug(match[1])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.fixture(scope="module")
def parser():
    return usage.build()


def test_options_page_is_current(parser):
    assert OPTIONS.is_file(), f"docs/options.md is missing; generate it with: {usage.REGENERATE}"
    assert usage.render_options(parser) == OPTIONS.read_text(encoding="utf-8"), (
        f"docs/options.md is stale (the parser or a method's Param changed); regenerate it with: "
        f"{usage.REGENERATE}")


def test_every_option_is_on_the_options_page(parser):
    page = OPTIONS.read_text(encoding="utf-8")
    missing = [option for action in parser._actions for option in action.option_strings
               if f"`{option}`" not in page]
    assert not missing, f"not on docs/options.md: {missing}; regenerate it with: {usage.REGENERATE}"


def test_options_page_does_not_depend_on_the_machine(parser):
    """--nprocs defaults to the CPU count and a path default may be absolute: neither reaches the page."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        parser.set_defaults(nprocs=98765, work_dir=Path("/machine/specific/work"))
        page = usage.render_options(parser)
    finally:
        parser.set_defaults(nprocs=defaults["nprocs"], work_dir=defaults["work_dir"])
    assert "98765" not in page and "/machine/specific" not in page
    assert usage.MACHINE_DEFAULTS["nprocs"] in page


def test_check_fails_on_a_stale_page_and_passes_on_a_fresh_one(tmp_path, capsys):
    page = tmp_path / "options.md"
    page.write_text("# Command-line options\n\nedited by hand\n", encoding="utf-8")
    assert usage.main(["--check", str(page)]) == 1
    assert "make docs" in capsys.readouterr().err
    assert usage.main([str(page)]) == 0
    assert usage.main(["--check", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == OPTIONS.read_text(encoding="utf-8")
    assert [path.name for path in tmp_path.iterdir()] == ["options.md"]  # no temporary file left


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines (at most 200): move the detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _LINK.findall(_prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading with anchor #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_named_repository_paths_exist(page):
    """A file the docs name (`bids_denoise/...`, `tests/...`, `benchmarks/...`) has not moved."""
    missing = [name for name in _CODE_PATH.findall(page.read_text(encoding="utf-8"))
               if not re.search(r"[<>*{}]", name) and not (ROOT / name).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_every_method_is_in_the_readme_table_and_the_methods_page():
    table = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    first_cells = [line.split("|")[1] for line in table]
    methods_page = _prose(DOCS / "methods.md")
    for name in load_all():
        assert any(f"`{name}`" in cell for cell in first_cells), f"{name}: no row in README.md's method table"
        assert re.search(rf"^## `{re.escape(name)}`\s*$", methods_page, re.MULTILINE), (
            f"{name}: no section '## `{name}`' in docs/methods.md")


def test_every_reference_is_on_the_methods_page():
    page = (DOCS / "methods.md").read_text(encoding="utf-8")
    missing = [f"{name}: {reference.key}" for name, spec in load_all().items()
               for reference in spec.references if reference.text not in page]
    assert not missing, f"references not in docs/methods.md: {missing}"
