"""The records that travel between the nodes of a run's graph.

A method's node writes its outputs into its own folder and describes each with a
:class:`Derivative`; the run's sinks and its report read those records. Nipype carries them as plain
dicts (its traits hash and pickle those), made and read here only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Derivative:
    """One file a method made: the main image, or a named map.

    Attributes
    ----------
    path : str
        Where the method's node wrote it (its working folder; the sink places it in OUTPUT_DIR).
    kind : {"image", "map"}
    name : str
        ``"image"``, or the map's name (its ``stat-`` entity).
    description : str
        The sidecar's ``Description``.
    member : int or None
        The run of a job of several runs it belongs to; None: the job's only run, or every run alike.
    entities : dict
        Entities the output adds to its source's (``res-`` of a new grid; ``stat-`` of a map).
    sidecar : dict
        Extra sidecar fields (the main image).
    warnings : list of str
        What the user should know (the main image).
    summary_key : str or None
        The QC summary field of a map (its median in the brain), if any.
    """

    path: str
    kind: str
    name: str
    description: str
    member: int | None = None
    entities: dict = field(default_factory=dict)
    sidecar: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    summary_key: str | None = None

    def __post_init__(self):
        if self.kind not in ("image", "map"):
            raise ValueError(f"a derivative is an image or a map, not {self.kind!r}")

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    def as_dict(self) -> dict:
        return asdict(self)


def read(payloads) -> list[Derivative]:
    """The records from what a node's ``derivatives`` output carries."""
    return [Derivative(**payload) for payload in payloads]


def write(derivatives) -> list[dict]:
    """What a node's ``derivatives`` output carries."""
    return [derivative.as_dict() for derivative in derivatives]


def main_image(derivatives) -> Derivative:
    """The main image among a run's records."""
    return next(derivative for derivative in derivatives if derivative.is_image)


def of_run(derivatives, index: int) -> list[Derivative]:
    """The records of run ``index`` of a job: its own and those every run shares."""
    return [derivative for derivative in derivatives if derivative.member in (None, index)]
