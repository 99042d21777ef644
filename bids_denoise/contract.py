"""The contract between a method and the app.

A method is declared once, by a :class:`MethodSpec` in its registration module
(``bids_denoise/registry/<name>.py``): its parameters (:class:`Param`: type,
default, choices, help), the modalities it takes, its references and a sentence
that describes a run of it. From that one declaration the app derives the
command-line options and their validation, the provenance, the citation and the
Nipype node. A method's ``run`` takes :class:`MethodInputs` and returns one
:class:`MethodResult`: the main image, any named maps, details for the
provenance, and the grid of the output when it is not the input's.

Nothing here names a method.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# ----------------------------------------------------------------------------------------------
# Parameter types: each parses the command-line text and refuses what it cannot take (argparse
# turns the refusal into a one-line usage error, exit 64). Defaults are given already parsed.


def boolean(text) -> bool:
    """``true``/``false`` (also yes/no, 1/0)."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def integers(minimum: int | None = None, *, allow_auto: bool = False) -> Callable:
    """One integer or three (``5`` or ``5,3,1``), each at least ``minimum``; optionally ``auto``."""

    def parse(text):
        if allow_auto and str(text).strip() in ("auto", ""):
            return None
        try:
            values = [int(part) for part in str(text).replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected one integer or three ('x,y,z'), got {text!r}") from None
        if len(values) not in (1, 3):
            raise argparse.ArgumentTypeError(f"expected one integer or three ('x,y,z'), got {text!r}")
        if minimum is not None and min(values) < minimum:
            raise argparse.ArgumentTypeError(f"each value must be at least {minimum}, got {text!r}")
        return values[0] if len(values) == 1 else values

    parse.__name__ = "integers"
    return parse


def integer_list(text) -> list[int]:
    """A list of integers (``2`` or ``0,2``)."""
    try:
        return [int(part) for part in str(text).replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as '2' or '0,2', got {text!r}") from None


def auto_or(parse: Callable) -> Callable:
    """``auto``, or a value ``parse`` takes."""

    def parse_auto(text):
        return "auto" if str(text).strip() == "auto" else parse(text)

    parse_auto.__name__ = f"auto or {getattr(parse, '__name__', 'value')}"
    return parse_auto


def positive(parse: Callable) -> Callable:
    """A number ``parse`` takes, above zero."""

    def parse_positive(text):
        value = parse(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, got {text!r}")
        return value

    parse_positive.__name__ = getattr(parse, "__name__", "number")
    return parse_positive


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a method: ``--<method>-<name>`` on the command line."""

    name: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    aliases: tuple = ()  # extra option strings, e.g. ("--sr-scale",)

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")

    def parse(self, text):
        """The typed value of ``text`` (a default is already typed and returned as it is)."""
        if not isinstance(text, str):
            return text
        value = self.type(text)
        if self.choices is not None and value not in self.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(map(str, self.choices))})")
        return value


@dataclass(frozen=True)
class Reference:
    """A publication a method's citation sentence cites as ``[key]``."""

    key: str
    text: str
    bibtex: str


@dataclass
class MethodInputs:
    """What a method's ``run`` receives: a checked run, loaded once.

    ``data`` is a 4D series (X, Y, Z, V) or a 3D image; ``bvals``/``bvecs`` are
    given for a DWI series and None otherwise; ``zooms`` are the voxel sizes;
    ``work_dir`` is the node's folder (e.g. for trained weights).

    A job of several runs read together (the echoes of a multi-echo BOLD run, or the DWI runs of a
    session) comes stacked along the volume axis: ``members`` gives each run's number of volumes
    and ``job`` what the runs are (``"echoes"`` or ``"session"``); a method gets such a job only
    if it declares that kind in :attr:`MethodSpec.joint` (the app runs any other method run by
    run). ``phase`` is the phase of a complex (``part-mag``/``part-phase``) run, stacked as
    ``data`` and in its file's units, given only to methods that declare ``takes_phase``.
    """

    data: np.ndarray
    affine: np.ndarray
    device: Any = "cpu"
    seed: int = 0
    bvals: np.ndarray | None = None
    bvecs: np.ndarray | None = None
    work_dir: Path | None = None
    phase: np.ndarray | None = None
    members: tuple = ()
    job: str = "run"

    @property
    def member_volumes(self) -> tuple:
        """The number of volumes of each run of the job (one run: the whole series)."""
        if self.members:
            return tuple(self.members)
        return (self.data.shape[3],) if self.data.ndim == 4 else (1,)

    def split(self, array) -> list:
        """``array``'s volumes (last axis) cut at the runs' boundaries."""
        bounds = np.cumsum(self.member_volumes)[:-1]
        return np.split(array, bounds, axis=-1) if array.ndim == 4 else [array]

    @property
    def zooms(self) -> np.ndarray:
        return np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)

    @property
    def is_series(self) -> bool:
        return self.data.ndim == 4


@dataclass
class OutputMap:
    """A named map beside the main image (e.g. the noise level): ``stat-<name>`` in its file name."""

    array: np.ndarray
    description: str
    #: the run-level summary the QC table and group table show (median inside the brain), if any
    summary_key: str | None = None
    #: for a job of several runs: ``array`` holds one 3D map per run, stacked along a fourth axis
    per_run: bool = False


@dataclass
class MethodResult:
    """What a method's ``run`` returns.

    Attributes
    ----------
    image : ndarray
        The main output (denoised, or super-resolved), 3D or 4D.
    description : str
        One sentence for the sidecar's ``Description``.
    maps : dict of str to OutputMap
    details : dict
        JSON-able facts of this run for the provenance (solver, calibration, training history ...).
    affine : ndarray or None
        The output's grid when it is not the input's (super-resolution).
    entities : dict
        Extra BIDS entities of the main output (e.g. ``{"res": "sr2"}``).
    sidecar : dict
        Extra sidecar fields of the main output.
    tables : dict of str to list of dict
        Tables the report shows (caption to rows), e.g. the pairs a network trained on.
    warnings : list of str
        What a user should know about this output (recorded in the sidecar and the log).
    member_volumes : tuple of int or None
        For a job of several runs: each run's number of output volumes where it is not its input's
        (e.g. noise scans dropped); the image is cut there and each part written under its run's name.
    """

    image: np.ndarray
    description: str
    maps: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    affine: np.ndarray | None = None
    entities: dict = field(default_factory=dict)
    sidecar: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    member_volumes: tuple | None = None


@dataclass(frozen=True)
class MethodSpec:
    """Everything the app needs to offer, run, describe and cite a method.

    ``run(inputs, parameters)`` takes :class:`MethodInputs` and the parsed
    parameter values and returns a :class:`MethodResult`. ``describe(parameters)``
    returns the citation sentence (citing ``[key]`` of its ``references``).
    ``role`` is ``"denoise"`` (offered by ``--methods``) or ``"superres"``
    (offered by ``--super-resolution``). ``joint`` names the jobs of several runs
    the method denoises as one (``"echoes"``, ``"session"``: see :class:`MethodInputs`; or a function of the
    parameters that returns them);
    ``session(parameters)``, where given, says whether these parameters want the DWI
    runs of a session read together; ``takes_phase`` that the method uses the phase
    of complex runs; ``check(parameters)``, where given, returns the usage error of parameter values
    that cannot go together (the CLI exits 64 with it), or None.
    """

    name: str
    title: str
    summary: str
    run: Callable[[MethodInputs, dict], MethodResult]
    describe: Callable[[dict], str]
    params: tuple = ()
    modalities: tuple = ("dwi",)
    references: tuple = ()
    role: str = "denoise"
    default: bool = False
    uses_gpu: bool = False
    #: trains a network: slow on a CPU (the demo and quick checks leave it out)
    learned: bool = False
    mem_gb: float = 1.0
    joint: tuple | Callable[[dict], tuple] = ()
    session: Callable[[dict], bool] | None = None
    takes_phase: bool = False
    #: ``check(parameters)``: a one-line usage error for values that cannot go together, or None
    check: Callable[[dict], str | None] | None = None

    def joint_kinds(self, parameters: dict) -> tuple:
        """The jobs of several runs these parameters denoise as one."""
        return tuple(self.joint(parameters) if callable(self.joint) else self.joint)

    def wants_session(self, parameters: dict) -> bool:
        return self.session is not None and bool(self.session(self.parse(parameters)))

    def defaults(self) -> dict:
        return {param.name: param.default for param in self.params}

    def parse(self, values: dict) -> dict:
        """Typed, validated parameter values: the defaults updated with ``values`` (text or typed)."""
        by_name = {param.name: param for param in self.params}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}")
        parsed = self.defaults()
        for name, value in values.items():
            parsed[name] = by_name[name].parse(value)
        return parsed

    def option_dest(self, param: Param) -> str:
        return f"{self.name}__{param.name}"


def default_of(function: Callable, name: str):
    """The default of ``function``'s keyword ``name``: the library's default is the app's."""
    import inspect

    return inspect.signature(function).parameters[name].default
