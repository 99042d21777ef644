"""The method contract: one declaration gives the options, the validation, the citation; names stay home."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from bids_denoise.cli import build_parser
from bids_denoise.contract import MethodSpec, Param, boolean, integers
from bids_denoise.registry import by_role, default_methods, load_all

PACKAGE = Path(__file__).resolve().parents[1] / "bids_denoise"


def test_every_method_declares_what_the_app_needs():
    methods = load_all()
    assert set(by_role("denoise")) | set(by_role("superres")) == set(methods)
    assert default_methods()  # --methods has a default
    for spec in methods.values():
        assert spec.params and spec.references and spec.modalities
        parsed = spec.parse({})
        assert parsed == spec.defaults()
        sentence = spec.describe(parsed)
        for key in re.findall(r"\[([a-z0-9]+)\]", sentence):
            assert key in {ref.key for ref in spec.references}, (spec.name, key)


def test_options_parsing_and_validation_come_from_the_declaration(capsys):
    methods = load_all()
    parser = build_parser(methods)
    help_text = parser.format_help()
    for spec in methods.values():
        for param in spec.params:
            assert f"--{spec.name}-{param.option}" in help_text
    args = parser.parse_args(["a", "b", "participant", "--mppca-stride", "1,1,2", "--patch2self-b0-denoising",
                              "false", "--median-radius", "2"])
    assert args.mppca__stride == (1, 1, 2) and args.patch2self__b0_denoising is False and args.median__radius == 2
    for bad in (["--mppca-stride", "0"], ["--patch2self-b0-denoising", "maybe"], ["--median-radius", "-1"],
                ["--mppca-extent", "3,3"], ["--noise2self-epochs", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["a", "b", "participant", *bad])
        assert exit_info.value.code == 64
        assert bad[0] in capsys.readouterr().err


def test_parameter_types():
    assert boolean("Yes") is True and boolean("0") is False
    assert integers(minimum=1)("5,3,1") == (5, 3, 1) and integers(allow_auto=True)("auto") is None
    with pytest.raises(ValueError, match="at least 1"):
        integers(minimum=1)("1,0,1")
    # a Param turns a parser's refusal into argparse's one-line usage error
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        Param("extent", integers(minimum=1)).parse("1,0,1")
    param = Param("mode", str, "a", choices=("a", "b"))
    assert param.parse("b") == "b" and param.parse(["kept"]) == ["kept"]
    with pytest.raises(argparse.ArgumentTypeError):
        param.parse("c")


def test_a_spec_refuses_unknown_parameters():
    spec = load_all()["mppca"]
    with pytest.raises(ValueError, match="unknown parameter"):
        spec.parse({"extnet": 3})


def test_method_names_appear_only_in_their_own_modules():
    """A method's name, as a string, is only in its methods/ module and its registration module. ('auto'
    is also every option's word for "choose for me": for it only the option prefix and the desc entity
    count.)"""
    names = list(load_all())
    assert "auto" in names
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(("methods/", "registry/")):
            continue
        text = path.read_text()
        for name in names:
            quoted = "" if name == "auto" else rf"['\"]{name}['\"]|"
            if re.search(rf"{quoted}--{name}-|desc-{name}", text):
                offenders.append(f"{relative}: {name}")
    assert not offenders, offenders


def test_a_new_method_is_one_declaration(tmp_path):
    """Registering a spec is all it takes for the CLI to offer it (the README's 'Adding a method')."""
    from bids_denoise import registry
    from bids_denoise.contract import MethodResult

    spec = MethodSpec(
        name="halve", title="Halve", summary="divides by a factor", describe=lambda p: "Halved.",
        run=lambda inputs, p: MethodResult(inputs.data / p["factor"], "halved"),
        params=(Param("factor", float, 2.0, "the divisor"),),
    )
    registry.register(spec)
    try:
        parser = build_parser(load_all())
        args = parser.parse_args(["a", "b", "participant", "--methods", "halve", "--halve-factor", "4"])
        assert args.methods == ["halve"] and args.halve__factor == 4.0
    finally:
        registry._REGISTRY.pop("halve")
