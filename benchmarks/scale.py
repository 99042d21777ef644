"""How each method's time and memory grow with the input, measured at two sizes, extrapolated to real ones.

    python benchmarks/scale.py [--threads 1] [--methods mppca patch2self ...] [--small 32 32 20] [--large 48 48 30]
                               [--volumes 65] [--bold-volumes 200] [--dwidenoise]

Each method runs through its registration (``spec.run``) at the app's defaults, in a fresh process with
``--threads`` BLAS/torch threads, on a brain-like phantom (``bids_denoise.testing.phantom.make_phantom`` for
DWI: 6 b0, the rest at b=1000 and b=2000; ``bids_denoise.testing.bold_phantom.make_bold_phantom`` for BOLD).
Learned methods train for a capped budget (their inference, over the whole series, is what grows with it).
Columns:

* seconds at each size, and their ratio (the voxel count grows by the size ratio);
* extra peak memory at each size, over the process after the input was built, in GB and as a multiple of
  the series' size in float32 (the method's ``mem_per_input`` declared to Nipype should bound it);
* the declared memory (``MethodSpec.memory_gb``) at the larger size, and whether it covers the measurement;
* extrapolations to real sizes, linear in voxels x volumes from the larger size: a typical research DWI
  140x140x90x100 (0.7 GB), HCP-like 145x174x145x288 (4.2 GB), and multiband BOLD 104x104x72x600 (1.9 GB).
  Time per voxel grows with the window for MP-PCA (its window holds at least as many voxels as volumes:
  cost per voxel ~ volumes x window voxels x components), which the extrapolation takes into account for
  MP-PCA on DWI (the ratio of the windows' matrix sizes); the others, and BOLD MP-PCA (its window is 3x3x3 at
  any length), are extrapolated linearly.

``--dwidenoise`` adds MRtrix3's ``dwidenoise`` (Debian's ``mrtrix3``) on the same data, ``-nthreads`` as given.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, run_registered, table  # noqa: E402

REAL = {  # name: (shape, volumes, modality)
    "research DWI 140x140x90x100": ((140, 140, 90), 100, "dwi"),
    "HCP-like 145x174x145x288": ((145, 174, 145), 288, "dwi"),
    "multiband BOLD 104x104x72x600": ((104, 104, 72), 600, "bold"),
}
DWI_METHODS = ("mppca", "patch2self", "median", "noise2self", "p2snet", "noise2noise")
BOLD_METHODS = ("mppca",)
LEARNED_BUDGET = {"epochs": 1, "max_seconds": 60.0, "steps_per_epoch": 3}


def make_dwi(shape, volumes, seed=0):
    from bids_denoise.testing.phantom import make_phantom

    n_b0 = 6
    per_shell = (volumes - n_b0) // 2
    shells = ((1000.0, per_shell), (2000.0, volumes - n_b0 - per_shell))
    phantom = make_phantom(tuple(shape), n_b0=n_b0, shells=shells, noise_sigma=0.05, seed=seed)
    return phantom.noisy.astype(np.float32), phantom.bvals, phantom.bvecs


def make_bold(shape, volumes, seed=0):
    from bids_denoise.testing.bold_phantom import make_bold_phantom

    phantom = make_bold_phantom(tuple(shape), volumes, snr=15.0, seed=seed)
    return phantom.magnitude[0].astype(np.float32), None, None


def runner(method):
    """The function the child process runs on an input (data, bvals, bvecs): the method at the app's defaults."""

    def run(payload):
        from bids_denoise import registry

        data, bvals, bvecs = payload
        spec = registry.load_all()[method]
        values = {key: value for key, value in LEARNED_BUDGET.items() if spec.learned
                  and key in {param.name for param in spec.params}}
        return float(np.mean(run_registered(method, data, bvals, bvecs, values)))

    return run


def declared_gb(method, shape):
    from bids_denoise import registry

    return registry.load_all()[method].memory_gb(shape)


def window_cost(volumes):
    """MP-PCA's cost per voxel at ``volumes``: the window (smallest odd cube of at least as many voxels as
    volumes) times the volumes times the components (~ the smaller dimension)."""
    edge = 1
    while edge**3 < volumes:
        edge += 2
    voxels = edge**3
    return voxels * volumes * min(voxels, volumes)


def dwidenoise_seconds(make, shape, volumes, threads):
    if shutil.which("dwidenoise") is None:
        return None
    import nibabel as nib

    data, _, _ = make(shape, volumes)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in.nii"
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(source))
        start = time.perf_counter()
        subprocess.run(["dwidenoise", str(source), str(Path(folder) / "out.nii"), "-nthreads", str(threads),
                        "-quiet", "-force"], check=True)
        return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(dict.fromkeys(DWI_METHODS + BOLD_METHODS)))
    parser.add_argument("--small", nargs=3, type=int, default=(32, 32, 20))
    parser.add_argument("--large", nargs=3, type=int, default=(48, 48, 30))
    parser.add_argument("--volumes", type=int, default=65)
    parser.add_argument("--bold-volumes", type=int, default=200)
    parser.add_argument("--dwidenoise", action="store_true")
    args = parser.parse_args(argv)

    rows = []
    cases = [(m, "dwi") for m in args.methods if m in DWI_METHODS] + [(m, "bold") for m in args.methods
                                                                    if m in BOLD_METHODS]
    if args.dwidenoise:
        cases.append(("dwidenoise", "dwi"))
    for method, modality in cases:
        make = make_dwi if modality == "dwi" else make_bold
        volumes = args.volumes if modality == "dwi" else args.bold_volumes
        measured = []
        for shape in (args.small, args.large):
            series_gb = float(np.prod(shape)) * volumes * 4 / 2**30
            if method == "dwidenoise":
                seconds, extra = dwidenoise_seconds(make, shape, volumes, args.threads), float("nan")
            else:
                seconds, extra, _ = measure(runner(method), lambda s=tuple(shape), v=volumes: make(s, v),
                                            threads=args.threads, warmup=lambda v=volumes: make((12, 12, 8), v))
            measured.append((shape, seconds, extra / 2**30, series_gb))
        (small, t0, m0, s0), (large, t1, m1, s1) = measured
        declared = declared_gb(method, tuple(large) + (volumes,)) if method != "dwidenoise" else float("nan")
        row = [f"{method} ({modality})", f"{t0:.1f}", f"{t1:.1f}", f"{t1 / t0:.2f}" if t0 else "",
               f"{m0:.2f} ({m0 / s0:.1f}x)", f"{m1:.2f} ({m1 / s1:.1f}x)",
               f"{declared:.2f} {'ok' if declared >= m1 + 0.3 else 'LOW'}" if declared == declared else ""]
        for name, (shape, real_volumes, real_modality) in REAL.items():
            if real_modality != modality:
                row.append("")
                continue
            grow = float(np.prod(shape)) * real_volumes / (float(np.prod(large)) * volumes)
            time_grow = grow * (window_cost(real_volumes) / window_cost(volumes) / (real_volumes / volumes)
                                if method in ("mppca", "dwidenoise") and modality == "dwi" else 1.0)
            real_gb = float(np.prod(shape)) * real_volumes * 4 / 2**30
            memory = f"{m1 / s1 * real_gb:.1f} GB" if m1 == m1 else ""
            row.append(f"{t1 * time_grow / 3600:.2f} h, {memory}")
        rows.append(row)
        print(f"done {method}", file=sys.stderr, flush=True)
    headers = ["method", f"s {'x'.join(map(str, args.small))}", f"s {'x'.join(map(str, args.large))}", "ratio",
               "extra GB (x series) small", "extra GB (x series) large", "declared GB large", *REAL]
    print(f"threads {args.threads}; DWI {args.volumes} volumes, BOLD {args.bold_volumes} volumes; learned methods "
          f"capped at {LEARNED_BUDGET}; voxel ratio {np.prod(args.large) / np.prod(args.small):.2f}")
    table(rows, headers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
