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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Parameter types (re-exported for the registrations): each reads a text value and refuses what it cannot
# take with a ValueError that says what was expected; :class:`Param` turns the refusal into argparse's
# one-line usage error (exit 64), on the command line and in a configuration file alike.
from bids_denoise.methods.core.options import auto_or, boolean, default_parser, integer_list, integers, number, positive  # noqa: F401


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
        """The typed value of ``text`` (a default is already typed and returned as it is); a value it
        cannot take raises ``argparse.ArgumentTypeError`` with one line saying why."""
        if not isinstance(text, str):
            return text
        try:
            value = self.type(text)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if self.choices is not None and value not in self.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(map(str, self.choices))})")
        return value

    @property
    def argparse_type(self) -> Callable:
        """``type`` for argparse: the one-line refusal of :meth:`parse` (choices are argparse's own)."""

        def parse(text):
            try:
                return self.type(text)
            except (ValueError, TypeError) as err:
                raise argparse.ArgumentTypeError(str(err)) from None

        parse.__name__ = getattr(self.type, "__name__", "value")
        return parse


@dataclass(frozen=True)
class ImageParam(Param):
    """A parameter whose value is an image: a 3D NIfTI file of the run's grid (or, where ``numbers``, one
    number that stands for a constant image).

    The app loads the file in the method's node, checks it against the run (its shape and affine, finite
    values, at least ``minimum`` everywhere, not all zero), records its SHA-256 in the provenance and
    hands the method the array (float64); the node's cache hashes the file's content, so a changed file
    reruns the method. A problem is a one-line error naming the file (exit 65).
    """

    numbers: bool = False
    #: the least value allowed; ``strict``: values must be above it
    minimum: float = 0.0
    strict: bool = False
    #: what the image is, in messages ("noise map", "g-factor map")
    what: str = "map"

    def __post_init__(self):
        object.__setattr__(self, "type", self._read)

    def _read(self, text):
        """A number (where allowed: finite, above ``minimum``), or an existing file's absolute path."""
        try:
            value = float(text)
        except (TypeError, ValueError):
            path = Path(str(text)).expanduser()
            if not path.is_file():
                allowed = "a number or an existing NIfTI file" if self.numbers else "an existing NIfTI file"
                raise ValueError(f"{text}: not {allowed}") from None
            return str(path.resolve())
        if not self.numbers:
            raise ValueError(f"{text}: a {self.what} is a NIfTI file, not a number")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"a {self.what} value must be a finite number above zero, got {text!r}")
        return value

    def names_file(self, value) -> bool:
        """Whether ``value`` (parsed) is a file to load (not None, not a number)."""
        return isinstance(value, str)

    def load(self, path, reference) -> np.ndarray:
        """The image at ``path`` as a float64 array, checked against ``reference`` (the run's nibabel image);
        ``InputDataError`` naming the file otherwise."""
        from bids_denoise.io import InputDataError, load_nifti

        image, values = load_nifti(path, ndim=3)
        grid = tuple(reference.shape[:3])
        if values.shape != grid:
            raise InputDataError(f"{path}: a {self.what} of shape {values.shape} for a run of shape "
                                 f"{tuple(reference.shape)}")
        if not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise InputDataError(f"{path}: the {self.what}'s affine differs from the run's (another grid or "
                                 "orientation: resample it to the run first)")
        low = float(values.min())
        if (low <= self.minimum) if self.strict else (low < self.minimum):
            bound = f"above {self.minimum:g}" if self.strict else f"at least {self.minimum:g}"
            raise InputDataError(f"{path}: a {self.what} must be {bound} everywhere (its least value is {low:g})")
        if not values.any():
            raise InputDataError(f"{path}: the {self.what} is zero everywhere")
        return values.astype(np.float64)


@dataclass(frozen=True)
class Reference:
    """A publication a method's citation sentence cites as ``[key]``."""

    key: str
    text: str
    bibtex: str


def split_volumes(array, volumes) -> list:
    """The parts of a job's stacked ``array`` that belong to each of its runs, whose numbers of volumes are
    ``volumes``: a series (X, Y, Z, V), b-values (V,) or b-vectors (3, V) cut along their last axis; an image
    without volumes (X, Y, Z), or None, is every run's."""
    if array is None or np.ndim(array) == 3:
        return [array] * len(volumes)
    if sum(volumes) != np.shape(array)[-1]:
        raise ValueError(f"{np.shape(array)[-1]} volumes for runs of {list(volumes)}")
    return np.split(array, np.cumsum(volumes)[:-1], axis=-1)


#: Share of negative values above which a series is not magnitude data (interpolation and rescaling leave a
#: few small negative values in magnitudes; real, phase-corrected or demeaned data have many)
NEGATIVE_SHARE = 0.01


def negative_share(data) -> float:
    """The share of a series' values below zero."""
    data = np.asarray(data)
    return float(np.count_nonzero(data < 0)) / max(data.size, 1)


def floor_warning(data, noise_floor: str) -> tuple[str, str | None]:
    """``noise_floor`` (``koay`` or ``none``) for ``data``, and a warning where removing the noise floor of
    magnitude data is refused: a series with more than :data:`NEGATIVE_SHARE` negative values is not a
    magnitude (its noise floor is no Rician one; the correction would set its low values to zero)."""
    share = negative_share(data) if noise_floor == "koay" else 0.0
    if share > NEGATIVE_SHARE:
        return "none", (f"{100 * share:.1f}% of the values are negative: not magnitude data, so the Rician noise "
                        "floor was not removed")
    return noise_floor, None


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
        """``array``'s volumes (last axis) cut at the runs' boundaries (a 3D array or None: one per run)."""
        return split_volumes(array, self.member_volumes)

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
    parameters that returns them): parameters whose kinds hold ``"session"`` want the DWI runs of a session
    read together; ``takes_phase`` that the method uses the phase
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
    #: memory the method's node needs: ``mem_gb`` GB plus ``mem_per_input`` times the job's series in float32
    #: (:meth:`memory_gb`; declared to Nipype, which schedules by it)
    mem_gb: float = 1.0
    mem_per_input: float = 0.0
    #: where the need is not linear in the series: ``memory(shape)``, GB beyond ``mem_gb`` (replaces
    #: ``mem_per_input``)
    memory: Callable[[tuple], float] | None = None
    joint: tuple | Callable[[dict], tuple] = ()
    takes_phase: bool = False
    #: ``check(parameters)``: a one-line usage error for values that cannot go together, or None
    check: Callable[[dict], str | None] | None = None

    def memory_gb(self, shape) -> float:
        """The memory (GB) the method needs for a job whose stacked series has ``shape`` (X, Y, Z[, V])."""
        if self.memory is not None:
            return float(self.mem_gb + self.memory(tuple(int(n) for n in shape)))
        size = float(np.prod([int(n) for n in shape])) * 4 / 2**30
        return float(self.mem_gb + self.mem_per_input * size)

    @property
    def image_params(self) -> tuple:
        """The parameters whose values may be image files (:class:`ImageParam`)."""
        return tuple(param for param in self.params if isinstance(param, ImageParam))

    def joint_kinds(self, parameters: dict) -> tuple:
        """The jobs of several runs these parameters denoise as one."""
        return tuple(self.joint(parameters) if callable(self.joint) else self.joint)

    def wants_session(self, parameters: dict) -> bool:
        """Whether these parameters want the DWI runs of a session read together (a ``"session"`` job)."""
        return "session" in self.joint_kinds(self.parse(parameters))

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


def params_from(options_class, *, defaults: dict | None = None, choices: dict | None = None,
                helps: dict | None = None, parsers: dict | None = None, names: dict | None = None) -> tuple:
    """The parameters of a method's options dataclass (``bids_denoise.methods.core.options``).

    Every field declared with ``app=True`` becomes a :class:`Param` with the field's parser, choices and
    help; ``defaults``, ``choices`` and ``helps`` give the app's where they differ from the function's
    (e.g. ``"auto"``, resolved per modality), by field name, and ``parsers`` how such values are read;
    ``names`` renames a field on the command line (field name to parameter name). Fields come in their
    declaration order.
    """
    import dataclasses

    defaults, choices, helps, names = defaults or {}, choices or {}, helps or {}, names or {}
    parsers = parsers or {}
    params = []
    for spec in dataclasses.fields(options_class):
        meta = spec.metadata
        if not meta.get("app", True):
            continue
        default = defaults.get(spec.name, spec.default)
        allowed = choices.get(spec.name, meta.get("choices"))
        parse = parsers.get(spec.name) or meta.get("parse") or default_parser(spec.default)
        params.append(Param(names.get(spec.name, spec.name), parse, default, helps.get(spec.name, meta["help"]),
                            choices=tuple(allowed) if allowed is not None else None))
    return tuple(params)
