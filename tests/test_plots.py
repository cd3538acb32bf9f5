"""Tests of cspine_utils.plots: the seaborn intensity distributions per class, and save_figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cspine_utils import plots


def test_intensity_histograms_one_distribution_per_class(tmp_path):
    rows = []
    for k in range(4):
        for label, level in (("normal", 60), ("fracture", 180)):
            image = np.full((16, 16), level, np.uint8)
            image[:4] = 0  # background, left out (pixels <= 0.02)
            path = tmp_path / f"{label}_{k}.png"
            Image.fromarray(image).save(path)
            rows.append({"path": str(path), "label": label})
    fig = plots.intensity_histograms(pd.DataFrame(rows), pixels_per_class=50)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["fracture", "normal"]
    # each class's step outline peaks at its own grey level (60/255 and 180/255)
    assert len(ax.lines) == 2
    peaks = sorted(float(line.get_xydata()[np.argmax(line.get_xydata()[:, 1]), 0]) for line in ax.lines)
    # the peak bin of 100 on [0, 1] starts at floor(100 * value) / 100
    assert peaks == pytest.approx([np.floor(60 / 255 * 100) / 100, np.floor(180 / 255 * 100) / 100])
    path = plots.save_figure(fig, "hist", folder=tmp_path)
    assert path.is_file() and path.suffix == ".png"
