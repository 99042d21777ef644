import numpy as np

from bids_denoise.methods.core.shells import cluster_shells, shell_bvalues


def test_scanner_jitter_stays_in_one_shell():
    bvals = [0, 5, 995, 1000, 1005, 1995, 2000, 2010, 40]
    labels = cluster_shells(bvals)
    assert labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 0]
    assert shell_bvalues(bvals, labels) == {0: 15.0, 1: 1000.0, 2: 2001.7}


def test_no_diffusion_weighting_is_all_b0():
    assert cluster_shells(np.zeros(4)).tolist() == [0, 0, 0, 0]
