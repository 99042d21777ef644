"""Reading and checking input images, and writing outputs atomically.

Every problem with an input becomes an :class:`InputDataError` whose message is
one line naming the file and what is wrong with it. Every output is written to
a hidden temporary name in its destination folder and renamed into place, so
an interrupted run never leaves a truncated file that looks finished.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np


class InputDataError(ValueError):
    """An input file is missing, unreadable or inconsistent (exit code 65)."""


def sha256_of(path) -> str:
    """Hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_nifti(path):
    """The image object (header read, data not yet), or InputDataError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise InputDataError(f"{path}: file is empty (0 bytes)")
    try:
        return nib.load(str(path))
    except _READ_ERRORS as err:
        raise InputDataError(f"{path}: not a readable NIfTI image (truncated or corrupt: {_reason(err)})") from None


_READ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError)


def _reason(err) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _check_ndim(path, shape, ndim):
    if ndim == 4 and (len(shape) != 4 or shape[3] < 2):
        raise InputDataError(f"{path}: expected a 4D series of volumes, got an image of shape {tuple(shape)}")
    if ndim == 3 and not (len(shape) == 3 or len(shape) == 4 and shape[3] == 1):
        raise InputDataError(f"{path}: expected a 3D image, got shape {tuple(shape)}")


def load_nifti(path, *, ndim=None, check_finite=True):
    """Load a NIfTI image and its data, or raise InputDataError naming the file.

    Parameters
    ----------
    path : path-like
    ndim : int, optional
        Required number of dimensions (a 4D image with one volume counts as 3D, and is returned 3D).
    check_finite : bool
        Reject NaN or infinite voxels.

    Returns
    -------
    image : nibabel.Nifti1Image
    data : ndarray (float32 unless the file holds float64)
    """
    image = _open_nifti(path)
    if ndim is not None:
        _check_ndim(path, image.shape, ndim)
    try:
        raw = np.asanyarray(image.dataobj)
    except _READ_ERRORS as err:
        raise InputDataError(f"{path}: not a readable NIfTI image (truncated or corrupt: {_reason(err)})") from None
    dtype = np.float64 if raw.dtype == np.float64 else np.float32
    data = np.asarray(raw, dtype=dtype)
    if ndim == 3 and data.ndim == 4:
        data = data[..., 0]
    if check_finite and not np.isfinite(data).all():
        count = int(data.size - np.isfinite(data).sum())
        raise InputDataError(f"{path}: {count} voxel value(s) are NaN or infinite")
    return image, data


def _read_table(path, ndmin, kind) -> np.ndarray:
    try:
        return np.loadtxt(path, ndmin=ndmin, dtype=float)
    except (OSError, ValueError) as err:
        raise InputDataError(f"{path}: not a readable {kind} file ({err})") from None


def read_bvals(path, n_volumes=None) -> np.ndarray:
    """Read an FSL-style .bval file (one row), checking its length."""
    path = Path(path)
    values = _read_table(path, 1, ".bval").ravel()
    if values.size == 0:
        raise InputDataError(f"{path}: the .bval file is empty")
    if not np.isfinite(values).all() or (values < 0).any():
        raise InputDataError(f"{path}: b-values must be finite and non-negative")
    if n_volumes is not None and values.size != n_volumes:
        raise InputDataError(f"{path}: {values.size} b-values for {n_volumes} volumes")
    return values


def read_bvecs(path, n_volumes=None) -> np.ndarray:
    """Read an FSL-style .bvec file, which must be 3 rows by one column per volume."""
    path = Path(path)
    values = _read_table(path, 2, ".bvec")
    if values.shape[0] != 3:
        raise InputDataError(f"{path}: a .bvec file must have 3 rows, found {values.shape[0]}")
    if not np.isfinite(values).all():
        raise InputDataError(f"{path}: gradient directions must be finite")
    if n_volumes is not None and values.shape[1] != n_volumes:
        raise InputDataError(f"{path}: {values.shape[1]} gradient directions for {n_volumes} volumes")
    return values


def _require_gradients(dwi_file, bval_file, bvec_file):
    if bval_file is None or not Path(bval_file).exists():
        raise InputDataError(f"{dwi_file}: no .bval file found for this DWI run")
    if bvec_file is None or not Path(bvec_file).exists():
        raise InputDataError(f"{dwi_file}: no .bvec file found for this DWI run")


def _check_fits_in_memory(path, shape) -> None:
    """Refuse an image whose header declares more voxels than this machine could hold (a corrupt header, or an
    image no method here can take): InputDataError before anything is read."""
    from bids_denoise.machine import total_memory_gb

    gigabytes = float(np.prod([int(n) for n in shape], dtype=np.float64)) * 4 / 2**30
    total = total_memory_gb()
    if gigabytes > total:
        raise InputDataError(f"{path}: its header declares a {'x'.join(map(str, shape))} image ({gigabytes:,.0f} GB "
                             f"as float32), more than this machine's memory ({total:.0f} GB)")


def check_run(in_file, bval_file=None, bvec_file=None, modality="dwi", phase_file=None) -> tuple:
    """Check a run from its header and gradient files, without reading its voxels.

    Returns its grid: (shape, affine, number of volumes: 1 for a 3D image). A phase image
    (``part-phase``) must have its magnitude's shape and affine. Voxel-level problems
    (truncated data, NaN) are found by :func:`load_run`, which reads it once.
    """
    if modality == "dwi":
        _require_gradients(in_file, bval_file, bvec_file)
    image = _open_nifti(in_file)
    _check_ndim(in_file, image.shape, 4 if modality in ("dwi", "bold") else 3)
    _check_fits_in_memory(in_file, image.shape)
    if modality == "dwi":
        read_bvals(bval_file, int(image.shape[3]))
        read_bvecs(bvec_file, int(image.shape[3]))
    if phase_file is not None:
        phase = _open_nifti(phase_file)
        if tuple(phase.shape) != tuple(image.shape):
            raise InputDataError(f"{phase_file}: a phase image of shape {tuple(phase.shape)} for a magnitude of "
                                 f"shape {tuple(image.shape)} ({Path(in_file).name})")
        if not np.allclose(phase.affine, image.affine, atol=1e-4):
            raise InputDataError(f"{phase_file}: the phase image's affine differs from its magnitude's "
                                 f"({Path(in_file).name})")
    volumes = int(image.shape[3]) if len(image.shape) == 4 else 1
    return tuple(int(n) for n in image.shape), np.asarray(image.affine), volumes


def load_run(in_file, bval_file=None, bvec_file=None, modality="dwi"):
    """Load and check a run: a 4D finite series with matching bval/bvec, or a 3D finite image.

    Returns
    -------
    image, data, bvals (or None), bvecs (or None)
    """
    if modality == "bold":
        image, data = load_nifti(in_file, ndim=4)
        return image, data, None, None
    if modality != "dwi":
        image, data = load_nifti(in_file, ndim=3)
        return image, data, None, None
    _require_gradients(in_file, bval_file, bvec_file)
    image, data = load_nifti(in_file, ndim=4)
    n_volumes = data.shape[3]
    return image, data, read_bvals(bval_file, n_volumes), read_bvecs(bvec_file, n_volumes)


def load_job(in_files, bval_files=None, bvec_files=None, phase_files=None, modality="dwi", phase_units=None):
    """Load the runs of a job (one run, a run's echoes, a session's DWI runs) stacked along the volumes.

    ``phase_units`` are the units each phase image's sidecar states (``auto`` where it does not): the
    phase is returned in radians.

    Returns
    -------
    data, bvals (or None), bvecs (or None), phase in radians (or None: given only when every run has one)
    """
    count = len(in_files)
    bval_files, bvec_files = bval_files or [None] * count, bvec_files or [None] * count
    parts, bvals, bvecs, phases = [], [], [], []
    for in_file, bval_file, bvec_file in zip(in_files, bval_files, bvec_files):
        image, data, run_bvals, run_bvecs = load_run(in_file, bval_file, bvec_file, modality)
        if parts and data.shape[:3] != parts[0].shape[:3]:
            raise InputDataError(f"{in_file}: shape {data.shape[:3]} differs from the other runs' "
                                 f"{parts[0].shape[:3]}: they are denoised together")
        parts.append(data)
        bvals.append(run_bvals)
        bvecs.append(run_bvecs)
    phase_units = list(phase_units or []) + ["auto"] * (len(phase_files or []) - len(phase_units or []))
    for phase_file, magnitude, units in zip(phase_files or [], parts, phase_units):
        _, phase = load_nifti(phase_file, ndim=magnitude.ndim)
        if phase.shape != magnitude.shape:
            raise InputDataError(f"{phase_file}: a phase image of shape {phase.shape} for a magnitude of shape "
                                 f"{magnitude.shape}")
        phases.append(phase_in_radians(phase_file, phase, units))
    stack = parts[0] if count == 1 else np.concatenate(parts, axis=3)
    phase = None
    if phases and len(phases) == count:
        phase = phases[0] if count == 1 else np.concatenate(phases, axis=3)
    if bvals[0] is None:
        return stack, None, None, phase
    return stack, np.concatenate(bvals), np.concatenate(bvecs, axis=1), phase


def phase_in_radians(path, phase, units="auto") -> np.ndarray:
    """A phase image in radians (float32): its units as its sidecar states them, else from its values' range;
    InputDataError naming the file where the values fit no known units (or not those stated)."""
    from bids_denoise.methods.core.errors import UnsuitableDataError
    from bids_denoise.methods.core.phase import TURNS, in_radians, phase_units

    if units != "auto":
        span = float(np.max(phase) - np.min(phase)) if phase.size else 0.0
        if span > TURNS[units] * 1.01:
            raise InputDataError(f"{path}: its sidecar says the phase is in {units}, but its values span {span:g}, "
                                 f"more than a full turn ({TURNS[units]:g})")
        return in_radians(phase, units).astype(np.float32)
    try:
        found = phase_units(phase, "auto")
    except UnsuitableDataError as err:
        raise InputDataError(f"{path}: {err}") from None
    return in_radians(phase, found).astype(np.float32)


def run_warnings(data, bvals=None, bvecs=None, *, b0_threshold=50.0) -> list[str]:
    """What is odd but not wrong about a run (recorded in the log and the outputs' sidecars)."""
    warnings = []
    if not np.any(data):
        warnings.append("the image is zero everywhere")
    if bvals is not None:
        weighted = np.flatnonzero(bvals > b0_threshold)
        if weighted.size == 0:
            warnings.append(f"no diffusion-weighted volume (every b-value is at most {b0_threshold:g})")
        norms = np.linalg.norm(bvecs[:, weighted], axis=0)
        odd = weighted[np.abs(norms - 1.0) > 0.1]
        if odd.size:
            warnings.append(f"volumes {odd.tolist()} have b > {b0_threshold:g} but a zero or non-unit b-vector")
    return warnings


@contextmanager
def atomic_path(destination, *, mode=0o644):
    """Yield a temporary path beside ``destination``; rename it into place on success.

    The temporary name, ``.<name>.<host>~<pid>~<random>.part<ext>``, tells a later
    run which process wrote it, so that one left by a killed run can be removed
    (:func:`stale_temporaries`). An OSError (a full disk) names the destination.
    ``mode`` is the finished file's permission bits (None leaves them).
    """
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(destination.suffixes)[-16:] or ".tmp"
        handle, temporary = tempfile.mkstemp(
            prefix=f".{_short(destination.name)}.{_HOST[:32]}~{os.getpid()}~", suffix=f".part{suffix}",
            dir=destination.parent,
        )
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(destination)) from None
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        if mode is not None:  # None: the temporary is a link to another file, whose mode is not ours to set
            os.chmod(temporary, mode)
        os.replace(temporary, destination)
    except OSError as err:
        if err.filename == str(destination):
            raise
        raise OSError(err.errno, err.strerror, str(destination)) from None
    finally:
        if temporary.exists():
            temporary.unlink()


_HOST = re.sub(r"[^0-9A-Za-z-]", "-", os.uname().nodename) if hasattr(os, "uname") else "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[0-9A-Za-z-]+)~(?P<pid>\d+)~[^/]*\.part[^/]*$")


def _short(name: str, keep: int = 64) -> str:
    """A file name cut to ``keep`` characters, with a digest of the whole: a temporary name beside a long output
    name stays within the file system's limit whenever the output's own name does."""
    if len(name) <= keep:
        return name
    return f"{name[: keep - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def stale_temporaries(folder, max_age_seconds=86400.0) -> list[Path]:
    """Temporary files under ``folder`` that a killed run left behind.

    One written on this host by a process that no longer runs is stale; one
    from another host (a cluster node) is stale once older than ``max_age_seconds``.
    """
    import time

    stale = []
    for path in Path(folder).rglob(".*.part*"):
        match = _TEMPORARY.match(path.name)
        if not match or not path.is_file():
            continue
        if match["host"] == _HOST[:32]:
            if not _alive(int(match["pid"])):
                stale.append(path)
        elif time.time() - path.stat().st_mtime > max_age_seconds:
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_nifti(data, reference, destination, dtype=None, affine=None):
    """Save ``data`` with the header (affine, qform/sform codes, zooms, units) of ``reference``.

    ``affine`` replaces the reference's (a new grid, e.g. after super-resolution); the voxel sizes
    follow from it and the qform/sform codes stay the reference's. ``dtype``: float32 by default, float64
    where float64 data hold values float32 cannot (squares of intensities near 1e30).
    """
    if dtype is None:
        data = np.asarray(data)
        beyond = data.dtype == np.float64 and data.size and np.nanmax(np.abs(data)) > np.finfo(np.float32).max
        dtype = np.float64 if beyond else np.float32
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    zooms = list(reference.header.get_zooms())
    qform, sform = reference.get_qform(), reference.get_sform()
    if affine is not None:
        qform = sform = np.asarray(affine, dtype=float)
        zooms[:3] = np.linalg.norm(sform[:3, :3], axis=0)
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), sform, header)
    image.set_qform(qform, code=int(reference.header["qform_code"]))
    image.set_sform(sform, code=int(reference.header["sform_code"]))
    image.header.set_zooms(tuple(zooms[: data.ndim]))
    image.header.set_xyzt_units(*reference.header.get_xyzt_units())
    image.header["scl_slope"] = np.nan
    image.header["scl_inter"] = np.nan
    with atomic_path(destination) as temporary:
        nib.save(image, str(temporary))
    return Path(destination)


def copy_atomic(source, destination) -> Path:
    """Copy a file into place atomically."""
    import shutil

    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)
    return Path(destination)


def place_image(source, destination) -> Path:
    """Put a NIfTI file at ``destination`` atomically, compressed or not as its name says."""
    source, destination = Path(source), Path(destination)
    if source.name.endswith(".gz") == destination.name.endswith(".gz"):
        return copy_atomic(source, destination)
    image = nib.load(str(source))
    with atomic_path(destination) as temporary:
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header), str(temporary))
    return destination


def write_text(text: str, destination) -> Path:
    with atomic_path(destination) as temporary:
        temporary.write_text(text)
    return Path(destination)


def write_json(payload, destination) -> Path:
    return write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n", destination)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
