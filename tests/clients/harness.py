"""Acceptance harness: the real fMRIPrep and QSIPrep, from PyPI, on a raw dataset and on bids-denoise's
``--output-layout bids`` output (issue 29).

What it does
------------
1. :func:`install` puts each program (:data:`CLIENTS`: fMRIPrep 25.2.7, QSIPrep 26.1.1) into a venv of
   its own, made by ``python3.11 -m venv`` and ``pip install`` from the package index, cached between
   runs in ``$BIDS_DENOISE_CLIENTS_CACHE`` (default ``~/.cache/bids-denoise/clients``) under a name
   that carries the version. A venv is built in a temporary folder beside its final place and renamed
   into place only once the program answers ``--version``, so an interrupted install is never reused
   (and, because a renamed venv's console scripts point at the old folder, the programs are started
   through their console entry point with the venv's ``python``, never through ``bin/<program>``).
   Where pip cannot install a program (no network, no wheel), :class:`ClientUnavailable` says why and
   the tests skip.
2. :func:`make_raw_dataset` writes a tiny valid raw BIDS dataset: T1w; a BOLD run with
   RepetitionTime, SliceTiming and events; a DWI run with bval/bvec, PhaseEncodingDirection and
   TotalReadoutTime; AP/PA PEPOLAR fieldmaps for the DWI through ``IntendedFor`` and AP/PA PEPOLAR
   fieldmaps for the BOLD through ``B0FieldIdentifier``/``B0FieldSource``.
3. :func:`run_clients` runs a program with ``--boilerplate-only`` (it builds its whole workflow graph,
   writes the citation boilerplate, ``OUT/logs/CITATION.md``, and stops) on several datasets at once,
   and then, in the same interpreter, the program's own input queries on the configuration the run
   saved and loaded back (:data:`COLLECT`): the files it collected, the fieldmap estimators it set up
   and which run each corrects (fMRIPrep), the DWI grouping and processing plan (QSIPrep), and the
   metadata of every collected image. :func:`comparable_boilerplate` and :func:`relative_inputs` make
   two runs comparable: the boilerplate of either program names no path, date or host (only the
   program's and its libraries' versions, the same for one install), and the collected inputs are
   made relative to the dataset (``<bids_dir>/...``).

Offline placeholders (used ONLY to let the programs build their workflow graphs with
``--boilerplate-only``; nothing is ever computed with them)
------------------------------------------------------------------------------------------------
* ``PLACEHOLDER_TEMPLATEFLOW`` (:func:`placeholder_templateflow`): a TemplateFlow home holding only the
  templates each program needs (:data:`TEMPLATEFLOW_TEMPLATES`, each with its real
  ``template_description.json`` from the templateflow package's own skeleton) and the template files
  it fetches while building its graph (:data:`TEMPLATEFLOW_FILES`), each a 2x2x2 image of zeros.
  fMRIPrep fetches 12 files; the list was found on TemplateFlow's full skeleton, where each missing
  file is downloaded, so it is what the real TemplateFlow serves: with fewer, fMRIPrep fails or builds
  a smaller graph. QSIPrep fetches none (it only checks that MNI152NLin2009cAsym exists). A home this
  small also spares each run the ~10 s that indexing TemplateFlow's 2,500-file skeleton takes.
* ``PLACEHOLDER_BIN`` (:func:`placeholder_bin`): shell scripts named like the ANTs, FSL, AFNI,
  FreeSurfer, MRtrix3 and DSI Studio commands that the programs look for on PATH
  (:data:`PLACEHOLDER_COMMANDS`); each prints a placeholder version, exits 0 and logs its call (the
  tests assert that they are only asked ``--version``, and ``mri_convert`` for fMRIPrep's FreeSurfer
  licence probe).
* ``PLACEHOLDER_LICENSE``: a FreeSurfer licence file with no licence in it (``--fs-license-file``).

The programs run with the network blocked (HTTP(S) proxies that refuse, ``NIPYPE_NO_ET``,
``--notrack``), with a throw-away HOME, and with nothing of this project's environment
(PYTHONPATH, VIRTUAL_ENV) leaking into theirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


class ClientUnavailable(RuntimeError):
    """The program could not be installed here (the tests skip with this reason)."""


@dataclass(frozen=True)
class Client:
    name: str
    version: str
    #: what pip installs besides the program. QSIPrep 26.1.1's wheel does not require ``toml``, which
    #: its config writer imports (``qsiprep.config.dumps``): without it every run fails at startup.
    extra: tuple = ()


CLIENTS = {
    "fmriprep": Client("fmriprep", "25.2.7"),
    "qsiprep": Client("qsiprep", "26.1.1", extra=("toml",)),
}

#: what ``pip install`` may take (a cold cache, a slow mirror)
INSTALL_TIMEOUT = 1800
#: what one ``--boilerplate-only`` run may take
RUN_TIMEOUT = 900


# --------------------------------------------------------------------------------------------------
# installing the programs


def cache_root() -> Path:
    configured = os.environ.get("BIDS_DENOISE_CLIENTS_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "bids-denoise" / "clients"


def base_python() -> str:
    """A Python 3.11 to make the venvs with (fMRIPrep's and QSIPrep's wheels are tested on it)."""
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise ClientUnavailable("no python3.11 here to make the programs' venvs with")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _client_env(venv: Path | None = None, **extra) -> dict:
    """A clean environment: nothing of this project's venv or PYTHONPATH."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONNOUSERSITE")
           and not key.startswith("PYTEST_")}
    path = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
            if p and Path(p).resolve() != Path(sys.executable).parent.resolve()]
    if venv is not None:
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def _version_of(venv: Path, client: Client) -> str:
    proc = subprocess.run([str(venv_python(venv)), "-c", ENTRY_POINT, client.name, "--version"],
                          capture_output=True, text=True, timeout=300, env=_client_env(venv))
    return (proc.stdout + proc.stderr).strip()


def install(client: Client, *, root: Path | None = None) -> tuple[Path, float]:
    """The venv holding ``client`` (installed now or earlier): (venv, seconds this call spent installing).

    Raises :class:`ClientUnavailable` where pip cannot install it.
    """
    root = Path(root) if root else cache_root()
    target = root / f"{client.name}-{client.version}-py311"
    stamp = target / ".bids-denoise-complete"
    if stamp.exists() and venv_python(target).exists():  # (a venv whose base Python is gone is rebuilt)
        return target, 0.0
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{client.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install of a program at a time (parallel sessions)
        if stamp.exists() and venv_python(target).exists():
            return target, 0.0
        if target.exists():  # broken, or not made by this function
            shutil.rmtree(target)
        for stale in root.glob(f".{target.name}.*"):  # interrupted installs
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            _run_install(staging, client)
            reported = _version_of(staging, client)
            if client.version not in reported:
                # installed but broken: a failure to report, not a reason to skip
                raise RuntimeError(f"{client.name} installed, but --version says {reported[-300:]!r}")
            (staging / ".bids-denoise-complete").write_text(f"{client.name}=={client.version}\n")
            staging.chmod(0o755)  # mkdtemp made it private
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target, time.monotonic() - start


def _run_install(venv: Path, client: Client):
    steps = (
        [base_python(), "-m", "venv", str(venv)],
        [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{client.name}=={client.version}", *client.extra],
    )
    for step in steps:
        try:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                                  env=_client_env())
        except subprocess.TimeoutExpired:
            raise ClientUnavailable(f"{' '.join(step[-3:])}: no answer within {INSTALL_TIMEOUT} s") from None
        if proc.returncode != 0:
            lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines()
                     if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
            lines = [line for line in lines if line.startswith("ERROR")] or lines[-4:]
            raise ClientUnavailable(f"could not install {client.name}=={client.version} "
                                    f"({Path(step[0]).name} {' '.join(step[1:3])} exited {proc.returncode}): "
                                    + " | ".join(lines)[-800:])


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------------------------------
# the offline placeholders

#: PLACEHOLDER_TEMPLATEFLOW: the templates each program must find in TemplateFlow's home (each with
#: its own template_description.json) ...
TEMPLATEFLOW_TEMPLATES = {
    "fmriprep": ("MNI152NLin2009cAsym", "OASIS30ANTs"),
    "qsiprep": ("MNI152NLin2009cAsym",),
}
#: ... and the template files it fetches while building its graph (found by running each program on
#: TemplateFlow's full skeleton: everything else they name is fetched at run time, never reached here)
TEMPLATEFLOW_FILES = {
    "fmriprep": (
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_desc-brain_mask.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_label-brain_probseg.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_desc-carpet_dseg.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-02_desc-fMRIPrep_boldref.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz",
        "tpl-OASIS30ANTs/tpl-OASIS30ANTs_res-01_T1w.nii.gz",
        "tpl-OASIS30ANTs/tpl-OASIS30ANTs_res-01_label-brain_probseg.nii.gz",
        "tpl-OASIS30ANTs/tpl-OASIS30ANTs_res-01_desc-BrainCerebellumExtraction_mask.nii.gz",
        "tpl-OASIS30ANTs/tpl-OASIS30ANTs_res-01_label-WM_probseg.nii.gz",
        "tpl-OASIS30ANTs/tpl-OASIS30ANTs_res-01_label-BS_probseg.nii.gz",
    ),
    "qsiprep": (),
}

#: PLACEHOLDER_BIN: the commands each program checks for on PATH before it accepts its graph
#: (fMRIPrep: ``check_deps``; QSIPrep: the same), by package
PLACEHOLDER_COMMANDS = {
    "fmriprep": {
        "ANTs": ("Atropos", "DenoiseImage", "ImageMath", "MultiplyImages", "N4BiasFieldCorrection",
                 "ThresholdImage", "antsAI", "antsApplyTransforms", "antsRegistration"),
        "FSL": ("bet", "fast", "flirt", "fslmaths", "mcflirt", "topup"),
        "AFNI": ("3dAutomask", "3dTshift", "3dUnifize"),
        "FreeSurfer": ("lta_convert", "mri_convert", "mri_coreg"),
    },
    "qsiprep": {
        "ANTs": ("ImageMath", "MultiplyImages", "N4BiasFieldCorrection", "antsAI", "antsApplyTransforms",
                 "antsRegistration"),
        "FSL": ("eddy_cpu", "flirt", "topup"),
        "AFNI": ("3dAutobox", "3dWarp", "3dcalc", "3dresample"),
        "FreeSurfer": ("mri_synthseg", "mri_synthstrip"),
        "MRtrix3": ("dwibiascorrect", "labelconvert"),
        "DSI Studio": ("dsi_studio",),
    },
}

PLACEHOLDER_SCRIPT = """#!/bin/sh
# PLACEHOLDER_BIN (bids-denoise tests/clients): stands in for {package}'s {name} so that {program}
# can build its workflow graph with --boilerplate-only; it computes nothing.
echo "$(basename "$0") $*" >> "{log}"
echo "{name} placeholder for {package} (bids-denoise client test): not the real program"
exit 0
"""


@dataclass
class Placeholders:
    """PLACEHOLDER_TEMPLATEFLOW, PLACEHOLDER_BIN and PLACEHOLDER_LICENSE for one program."""

    program: str
    templateflow: Path
    bin: Path
    license: Path
    calls: Path  # what the placeholder commands were called with, one call a line
    home: Path  # a throw-away HOME

    def env(self, venv: Path) -> dict:
        blocked = "http://127.0.0.1:9"  # a port nothing listens on: every download fails at once
        env = _client_env(venv, TEMPLATEFLOW_HOME=self.templateflow, TEMPLATEFLOW_AUTOUPDATE=0,
                          TEMPLATEFLOW_USE_DATALAD=0, HOME=self.home, FS_LICENSE=self.license,
                          FSLOUTPUTTYPE="NIFTI_GZ", NIPYPE_NO_ET=1, NO_ET=1, MPLBACKEND="Agg",
                          OMP_NUM_THREADS=1, PYTHONHASHSEED=0, HTTP_PROXY=blocked, HTTPS_PROXY=blocked,
                          http_proxy=blocked, https_proxy=blocked)
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        env["PATH"] = os.pathsep.join([str(self.bin), env["PATH"]])
        return env

    def called(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


def _tiny_image(path: Path):
    """A 2x2x2 image of zeros, its voxel size taken from the name's res- entity."""
    match = re.search(r"_res-0*(\d+)_", path.name)
    size = float(match.group(1)) if match else 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.diag([size, size, size, 1.0])), str(path))


def placeholder_templateflow(home: Path, templates, files, venv: Path) -> Path:
    """PLACEHOLDER_TEMPLATEFLOW: ``templates`` with their own descriptions, ``files`` as tiny images."""
    skeletons = sorted(venv.glob("lib/python*/site-packages/templateflow/conf/templateflow-skel.zip"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "PLACEHOLDER_TEMPLATEFLOW.md").write_text(
        "Placeholder TemplateFlow home made by bids-denoise's tests/clients: tiny images of zeros under\n"
        "the names the programs fetch while building their graphs. Not TemplateFlow's templates.\n")
    for template in sorted({f"tpl-{name}" for name in templates} | {Path(name).parts[0] for name in files}):
        description = home / template / "template_description.json"
        description.parent.mkdir(parents=True, exist_ok=True)
        if skeletons:
            with zipfile.ZipFile(skeletons[0]) as skeleton:
                with contextlib.suppress(KeyError):
                    description.write_bytes(skeleton.read(f"{template}/template_description.json"))
        if not description.exists():
            description.write_text(json.dumps({"Identifier": template.removeprefix("tpl-"),
                                                "Name": template.removeprefix("tpl-")}))
    for name in files:
        _tiny_image(home / name)
    return home


def placeholder_bin(folder: Path, program: str, calls: Path) -> Path:
    """PLACEHOLDER_BIN: one placeholder script per command that ``program`` looks for."""
    folder.mkdir(parents=True, exist_ok=True)
    for package, names in PLACEHOLDER_COMMANDS[program].items():
        for name in names:
            script = folder / name
            script.write_text(PLACEHOLDER_SCRIPT.format(package=package, name=name, program=program, log=calls))
            script.chmod(0o755)
    return folder


def make_placeholders(root: Path, program: str, venv: Path) -> Placeholders:
    root = Path(root)
    license = root / "PLACEHOLDER_LICENSE" / "license.txt"
    license.parent.mkdir(parents=True, exist_ok=True)
    license.write_text("PLACEHOLDER_LICENSE: no FreeSurfer licence (bids-denoise client test; nothing runs)\n")
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    client = CLIENTS[program]
    # fMRIPrep and QSIPrep ask PyPI whether they are the latest release unless a fresh answer is cached
    latest = home / ".cache" / program / "latest"
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(f"{client.version}|{time.strftime('%Y-%m-%d')}")
    calls = root / "PLACEHOLDER_BIN.calls"
    return Placeholders(
        program=program,
        templateflow=placeholder_templateflow(root / "PLACEHOLDER_TEMPLATEFLOW", TEMPLATEFLOW_TEMPLATES[program],
                                              TEMPLATEFLOW_FILES[program], venv),
        bin=placeholder_bin(root / "PLACEHOLDER_BIN", program, calls),
        license=license, calls=calls, home=home)


# --------------------------------------------------------------------------------------------------
# the raw dataset

SUBJECT = "01"
TASK = "motor"
BOLD_SHAPE = (14, 14, 10)  # 3 mm: MP-PCA's default window fits
N_BOLD = 24
TR = 2.0
DWI_SHAPE = (14, 14, 10)  # 2 mm
N_B0, N_DIRECTIONS = 2, 14  # QSIPrep takes a DWI series of fewer than 16 volumes for a reverse-PE scan


def _save(array, affine, path: Path, *, dtype=np.float32, tr=None):
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        image.header.set_zooms(tuple(image.header.get_zooms()[:3]) + (tr,))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def _json(path: Path, content: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def make_raw_dataset(root: Path, subjects=(SUBJECT,)) -> Path:
    """A tiny raw BIDS dataset for both programs (see the module docstring)."""
    from bids_denoise.testing.phantom import make_anatomical, make_phantom

    root = Path(root)
    _json(root / "dataset_description.json", {
        "Name": "bids-denoise client acceptance", "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "License": "CC0", "Authors": ["bids-denoise"]})
    (root / "README").write_text("A tiny synthetic dataset on which fMRIPrep and QSIPrep build their graphs "
                                 "(bids-denoise tests/clients).\n")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    _json(root / "participants.json", {"participant_id": {"Description": "label"}})
    for index, label in enumerate(subjects):
        sub = f"sub-{label}"
        seed = 10 * index
        _, t1w, affine = make_anatomical((24, 24, 20), noise_sigma=0.03, seed=seed + 1, voxel_size=1.5)
        _save(np.round(t1w), affine, root / sub / "anat" / f"{sub}_T1w.nii.gz", dtype=np.int16)

        # BOLD: a block design, interleaved slices, its fieldmap through B0FieldSource
        rng = np.random.default_rng(seed + 2)
        signal, _, bold_affine = make_anatomical(BOLD_SHAPE, noise_sigma=0.0, seed=seed + 2, voxel_size=3.0)
        times = np.arange(N_BOLD) * TR
        series = signal[..., None] * (1.0 + 0.02 * ((times // 12.0) % 2 == 1))
        bold = np.abs(series + rng.normal(0, signal[signal > 0].mean() / 20, series.shape))
        func = root / sub / "func"
        _save(bold, bold_affine, func / f"{sub}_task-{TASK}_bold.nii.gz", tr=TR)
        n_slices = BOLD_SHAPE[2]
        order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
        _json(func / f"{sub}_task-{TASK}_bold.json", {
            "TaskName": TASK, "RepetitionTime": TR, "EchoTime": 0.03,
            "SliceTiming": [round(order.index(s) * TR / n_slices, 4) for s in range(n_slices)],
            "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.03, "B0FieldSource": "pepolarbold"})
        (func / f"{sub}_task-{TASK}_events.tsv").write_text(
            "onset\tduration\ttrial_type\n" + "".join(f"{t:.1f}\t12.0\ttap\n" for t in np.arange(12.0, N_BOLD * TR, 24.0)))

        # DWI: one shell, its fieldmap through IntendedFor
        phantom = make_phantom(DWI_SHAPE, n_b0=N_B0, shells=((1000.0, N_DIRECTIONS),), noise_sigma=0.05, seed=seed + 3)
        dwi = root / sub / "dwi" / f"{sub}_dwi"
        _save(np.round(phantom.noisy), phantom.affine, Path(f"{dwi}.nii.gz"), dtype=np.int16)
        np.savetxt(f"{dwi}.bval", np.round(phantom.bvals)[None, :], fmt="%d")
        np.savetxt(f"{dwi}.bvec", phantom.bvecs, fmt="%.6f")
        _json(Path(f"{dwi}.json"), {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05, "EchoTime": 0.089,
                                    "RepetitionTime": 3.2})

        fmap = root / sub / "fmap"
        b0 = phantom.noisy[..., phantom.bvals < 50][..., :1]
        for direction, encoding in (("AP", "j-"), ("PA", "j")):
            name = f"{sub}_acq-dwi_dir-{direction}_epi"
            _save(np.round(b0), phantom.affine, fmap / f"{name}.nii.gz", dtype=np.int16)
            _json(fmap / f"{name}.json", {
                "PhaseEncodingDirection": encoding, "TotalReadoutTime": 0.05, "EchoTime": 0.089,
                "RepetitionTime": 3.2, "IntendedFor": [f"bids::{sub}/dwi/{sub}_dwi.nii.gz"]})
            name = f"{sub}_acq-bold_dir-{direction}_epi"
            _save(bold[..., :1], bold_affine, fmap / f"{name}.nii.gz")
            _json(fmap / f"{name}.json", {
                "PhaseEncodingDirection": encoding, "TotalReadoutTime": 0.03, "EchoTime": 0.03,
                "RepetitionTime": TR, "B0FieldIdentifier": "pepolarbold"})
    return root


# --------------------------------------------------------------------------------------------------
# running the programs

#: started with the venv's python: a program's console entry point, by name (argv[1]), with argv[2:]
ENTRY_POINT = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name=sys.argv[1]); "
    "sys.argv = sys.argv[1:]; sys.exit(ep.load()())"
)

#: run in the program's interpreter once its --boilerplate-only run has exited: the program's own input
#: queries, on the configuration that run saved and loaded back. Writes JSON to argv[1].
COLLECT = {
    "fmriprep": """
from fmriprep import config
from niworkflows.utils.bids import collect_data
from fmriprep.workflows.base import map_fieldmap_estimation
from niworkflows.utils.connections import listify

layout = config.execution.layout
result = {}
for subject, sessions in config.execution.processing_groups:  # as init_fmriprep_wf walks them
    sessions = listify(sessions)
    data = collect_data(layout, subject, session_id=sessions, task=config.execution.task_id,
                        echo=config.execution.echo_idx, bids_filters=config.execution.bids_filters)[0]
    bold = [sorted(run if isinstance(run, list) else [run]) for run in data['bold']]
    estimators, corrected = map_fieldmap_estimation(
        layout, subject, sessions, bold, 'fieldmaps' in config.workflow.ignore, config.workflow.use_syn_sdc,
        config.workflow.force_syn, config.execution.bids_filters)
    result[subject] = {
        'collected': data,
        'fieldmaps': {e.bids_id: {'method': e.method.name, 'sources': sorted(str(s.path) for s in e.sources)}
                      for e in estimators},
        'corrected_by': corrected,
    }
""",
    "qsiprep": """
from qsiprep import config
from qsiplan import describe_processing, report_text
from qsiprep.utils.bids import collect_data
from qsiprep.utils.plan import method_selection_from_config
from qsiprep.workflows.base import _build_dwi_plan

layout = config.execution.layout
result = {}
for subject, sessions in config.execution.processing_list:  # as init_qsiprep_wf walks them
    data = collect_data(layout, subject, session_label=sessions,
                        filters=config.execution.bids_filters, bids_validate=False,
                        ignore=config.workflow.ignore)[0]
    selection = method_selection_from_config()
    grouping, plan = _build_dwi_plan(data, selection)
    result[subject] = {
        'collected': data,
        'grouping': report_text(grouping),
        'processing': describe_processing(grouping, selection),
        'grouping_errors': [issue.render() for issue in grouping.errors],
    }
""",
}

RUNNER = """
import json, sys, traceback
from importlib.metadata import entry_points


def main():
    name, report = sys.argv[1], sys.argv[2]
    sys.argv = [name] + sys.argv[3:]
    (ep,) = entry_points(group='console_scripts', name=name)
    try:
        code = ep.load()()
    except SystemExit as stop:
        code = stop.code
    code = 0 if code is None else code if isinstance(code, int) else 1
    out = {'returncode': code}
    if code == 0:
        try:
            found = {}
            exec(compile(COLLECT, '<collect>', 'exec'), found)
            layout, metadata = found['layout'], {}

            def walk(value):
                if isinstance(value, str) and value.endswith(('.nii', '.nii.gz')):
                    metadata[value] = layout.get_metadata(value)
                elif isinstance(value, (list, tuple)):
                    for item in value:
                        walk(item)
                elif isinstance(value, dict):
                    for item in value.values():
                        walk(item)

            walk(found['result'])
            out.update(inputs=found['result'], metadata=metadata)
        except Exception:
            out['collect_error'] = traceback.format_exc()
    with open(report, 'w') as handle:
        json.dump(out, handle, indent=1, sort_keys=True, default=str)
    sys.exit(code)


if __name__ == '__main__':  # the programs' worker processes import this file again
    main()
"""


def client_args(program: str, bids_dir: Path, out: Path, work: Path, placeholders: Placeholders) -> list[str]:
    """The command line (after the program's name) that builds the graph and writes the boilerplate."""
    common = [str(bids_dir), str(out), "participant", "--participant-label", SUBJECT, "--boilerplate-only",
              "--skip-bids-validation", "--nprocs", "1", "--omp-nthreads", "1", "-w", str(work), "--notrack"]
    if program == "fmriprep":
        # --md-only-boilerplate: no pandoc; --fs-no-reconall: FreeSurfer's recon-all is not in the graph
        return common + ["--md-only-boilerplate", "--fs-license-file", str(placeholders.license),
                         "--fs-no-reconall"]
    if program == "qsiprep":
        # --denoise-method none: the input is denoised already (QSIPrep's default is dwidenoise);
        # --output-resolution has no default
        return common + ["--denoise-method", "none", "--output-resolution", "2"]
    raise ValueError(program)


@dataclass
class ClientRun:
    program: str
    bids_dir: Path
    out: Path
    work: Path
    returncode: int
    log: str
    seconds: float
    report: dict = field(default_factory=dict)

    @property
    def boilerplate(self) -> str | None:
        path = self.out / "logs" / "CITATION.md"
        return path.read_text() if path.exists() else None

    @property
    def nodes(self) -> int | None:
        match = re.search(r"workflow graph with (\d+) nodes built successfully", self.log)
        return int(match.group(1)) if match else None

    def tail(self, lines=40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def start_client(program: str, venv: Path, bids_dir: Path, folder: Path, placeholders: Placeholders):
    """Start one --boilerplate-only run; :func:`finish_client` waits for it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out, work, report = folder / "out", folder / "work", folder / "report.json"
    script = folder / "run_client.py"
    script.write_text(f"COLLECT = {COLLECT[program]!r}\n{RUNNER}")
    log = open(folder / "log.txt", "w")
    command = [str(venv_python(venv)), str(script), program, str(report),
               *client_args(program, Path(bids_dir), out, work, placeholders)]
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=placeholders.env(venv), cwd=folder)
    return proc, log, time.monotonic(), (program, Path(bids_dir), out, work, report, folder)


def finish_client(started, timeout=RUN_TIMEOUT) -> ClientRun:
    proc, log, start, (program, bids_dir, out, work, report, folder) = started
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        log.close()
    seconds = time.monotonic() - start
    text = (folder / "log.txt").read_text(errors="replace")
    return ClientRun(program, bids_dir, out, work, proc.returncode, text, seconds,
                     json.loads(report.read_text()) if report.exists() else {})


def run_clients(program: str, venv: Path, datasets: dict, folder: Path, placeholders: Placeholders) -> dict:
    """``program`` on each of ``datasets`` ({label: bids_dir}) at once: {label: ClientRun}."""
    started = {label: start_client(program, venv, bids_dir, Path(folder) / label, placeholders)
               for label, bids_dir in datasets.items()}
    return {label: finish_client(run) for label, run in started.items()}


# --------------------------------------------------------------------------------------------------
# making two runs comparable

RUN_ID = re.compile(r"\d{8}-\d{6}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _strip_paths(text: str, run: ClientRun) -> str:
    for path, tag in ((run.work, "<work>"), (run.out, "<out>"), (run.bids_dir, "<bids_dir>")):
        for form in {str(path), str(Path(path).resolve())}:
            text = text.replace(form, tag)
    return RUN_ID.sub("<run-id>", text)


def comparable_boilerplate(run: ClientRun) -> str:
    """The citation boilerplate with the dataset, output and work paths and run identifiers removed.

    (fMRIPrep's and QSIPrep's boilerplate name no path, date or host today; versions are the same for
    two runs of one install, so they stay.)"""
    return _strip_paths(run.boilerplate or "", run)


def relative_inputs(run: ClientRun):
    """What the program collected, fieldmaps and groupings, with paths relative to its bids_dir."""
    def relative(value):
        if isinstance(value, str):
            return _strip_paths(value, run)
        if isinstance(value, list):
            return [relative(item) for item in value]
        if isinstance(value, dict):
            return {relative(key): relative(item) for key, item in value.items()}
        return value

    return relative(run.report.get("inputs"))


def relative_metadata(run: ClientRun) -> dict:
    return {_strip_paths(path, run): metadata for path, metadata in run.report.get("metadata", {}).items()}


# --------------------------------------------------------------------------------------------------
# bids-denoise


def run_bids_denoise(raw: Path, out: Path, work: Path, *args, timeout=900) -> subprocess.CompletedProcess:
    """bids-denoise as a user runs it, from this project's venv."""
    command = [sys.executable, "-m", "bids_denoise", str(raw), str(out), "participant", "-w", str(work), *map(str, args)]
    env = dict(os.environ, NIPYPE_NO_ET="1")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(out).parent)


def file_states(root: Path) -> dict:
    """Every file under root: (bytes, inode, mode), to prove that nothing wrote into it."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mode)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}
