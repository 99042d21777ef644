"""Checked loading and atomic writing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_denoise.io import InputDataError, atomic_path, load_nifti, read_bvecs, save_nifti


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    destination = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(destination) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_save_keeps_geometry(tmp_path):
    affine = np.array([[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1.0]])
    source = nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=4)
    source.header.set_zooms((2, 2, 2.5, 3.2))
    source.header.set_xyzt_units("mm", "sec")
    path = save_nifti(np.ones((4, 5, 6, 3)), source, tmp_path / "x.nii.gz")
    saved = nib.load(path)
    assert np.allclose(saved.affine, affine)
    assert saved.header.get_zooms() == (2, 2, 2.5, 3.2)
    assert int(saved.header["qform_code"]) == 1 and int(saved.header["sform_code"]) == 4
    assert saved.header.get_xyzt_units() == ("mm", "sec")
    assert saved.get_data_dtype() == np.float32


def test_bvec_shape_and_nifti_errors(tmp_path):
    bvec = tmp_path / "x.bvec"
    bvec.write_text("1 0\n0 1\n0 0\n")
    with pytest.raises(InputDataError, match="2 gradient directions for 3 volumes"):
        read_bvecs(bvec, 3)
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputDataError, match=r"x\.nii\.gz: not a readable NIfTI"):
        load_nifti(bad)
