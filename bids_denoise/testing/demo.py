"""``make demo``: build a phantom BIDS dataset, run the app on it, show what came out.

Usage: ``python -m bids_denoise.testing.demo DEMO_DIR``
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_denoise.cli import main as cli_main
from bids_denoise.outputs import Source, layout_for
from bids_denoise.registry import by_role
from bids_denoise.testing.phantom import make_bids_dataset


def demo_methods() -> list[str]:
    """The DWI denoisers that need no training (the learned ones want a GPU or minutes of CPU)."""
    return [name for name, spec in by_role("denoise").items() if "dwi" in spec.modalities and not spec.learned]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "demo").resolve()
    raw, out, work = root / "rawdata", root / "derivatives" / "bids-denoise", root / "work"
    truths = make_bids_dataset(raw, shape=(32, 32, 20), shells=((1000.0, 30), (2000.0, 30)), n_b0=4,
                               truth_dir=root / "truth")
    print(f"phantom BIDS dataset: {raw}")
    methods = demo_methods()
    code = cli_main([str(raw), str(out), "participant", "--methods", *methods, "-w", str(work)])
    if code:
        return code
    cli_main([str(raw), str(out), "group"])
    print("\noutput tree:")
    for path in sorted(out.rglob("*")):
        if path.is_file() and "log" not in path.parts:
            print("  " + str(path.relative_to(out)))
    layout = layout_for(out)
    print("\nerror against the known noise-free signal (RMSE inside the brain):")
    for relpath, truth in ((r, t) for r, t in truths.items() if "/dwi/" in r):
        signal = nib.load(truth).get_fdata()
        brain = signal[..., 0] > 0
        noisy = nib.load(raw / relpath).get_fdata()
        row = [f"{Path(relpath).name:46s} noisy {np.sqrt(np.mean((noisy - signal)[brain] ** 2)):6.2f}"]
        for method in methods:
            path = layout.image(Source.from_relpath(relpath), method)
            denoised = nib.load(path).get_fdata()
            row.append(f"{method} {np.sqrt(np.mean((denoised - signal)[brain] ** 2)):6.2f}")
        print("  " + "  ".join(row))
    print(f"\nlook at: {out}/sub-01/ (denoised series, noise maps, sidecars), {out}/group.tsv")
    print(f"report: {out / 'sub-01.html'} (group summary: {out / 'group.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
