"""Reference numbers for the ViT position-embedding resampling (big_vision `resample_posemb`):
scipy.ndimage.zoom(grid, (g_new/g_old, g_new/g_old, 1), order=1).

Writes tests/fixtures/posemb_zoom.json. Run: pip install scipy numpy; python3 scripts/posemb_reference.py
"""
import json
import pathlib

import numpy as np
import scipy
import scipy.ndimage

rng = np.random.default_rng(0)
cases = []
for g_old, g_new, d in [(4, 8, 3), (16, 32, 2), (3, 5, 2), (8, 4, 2)]:
    grid = rng.standard_normal((g_old, g_old, d)).astype(np.float32)
    zoom = (g_new / g_old, g_new / g_old, 1)
    out = scipy.ndimage.zoom(grid, zoom, order=1)
    assert out.shape == (g_new, g_new, d), out.shape
    cases.append({"g_old": g_old, "g_new": g_new, "d": d,
                  "input": grid.reshape(-1).tolist(), "output": out.reshape(-1).tolist()})
out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/posemb_zoom.json"
out.write_text(json.dumps({"scipy": scipy.__version__, "numpy": np.__version__, "cases": cases}))
print("wrote", out)
