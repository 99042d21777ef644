"""Reports: figures that never fail on odd data, the citation written from the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_denoise.registry import load_all
from bids_denoise.reports import figures
from bids_denoise.reports.citation import render_citation


@pytest.mark.parametrize("offset", [0.0, -0.7, -5.0])
def test_figures_of_negative_or_flat_series(tmp_path, offset):
    rng = np.random.default_rng(0)
    series = rng.normal(1.0, 0.1, (8, 9, 6, 3)).astype(np.float32) + offset * 1.1
    low, high = figures.display_range(series)
    assert low < high
    assert figures.display_range(np.zeros((3, 3, 3))) == (0.0, 1.0)
    figures.mosaic(series, series * 0.9, [("b0", 0)], tmp_path / "m.png", "t")
    figures.map_figure(series[..., 0], tmp_path / "map.png", "t")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_citation_from_what_ran(tmp_path):
    sidecars = []
    for name, spec in load_all().items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"Provenance": {"Method": name, "Parameters": spec.defaults(),
                                                    "SoftwareVersions": {"bids-denoise": "0.1.0", "dipy": None}}}))
        sidecars.append(path)
    text, bib = render_citation(sidecars)
    for spec in load_all().values():
        assert spec.describe(spec.defaults()) in text
        for reference in spec.references:
            assert f"[{reference.key}]" in text and reference.bibtex in bib
    assert "Nipype" in text and "garyfallidis2014" not in text  # DIPY not cited when absent
    assert render_citation([]) is None
