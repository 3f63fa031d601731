#!/usr/bin/env python3
"""Reference masks for COCO polygons, rasterised by pycocotools itself.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install pycocotools==2.0.11 numpy
    /tmp/pyref/bin/python scripts/mask_reference.py > tests/fixtures/masks/polygons.json

Each case is one object's `segmentation` (a list of polygons) on an image of `height × width`,
and the mask pycocotools makes of it the way COCO/RefCOCO tooling does:
`mask.decode(mask.merge(mask.frPyObjects(polygons, h, w)))`, written as its compressed RLE
string. The cases cover what the even-odd fill at pixel centres gets wrong: overlapping
polygons of one object (a union, not an XOR), concave and self-intersecting outlines, edges on
the image border or past it, vertices on pixel centres and half-pixels, repeated vertices,
slivers thinner than a pixel.
"""
import json
import math
import random

import numpy as np
from pycocotools import mask as mask_utils

rng = random.Random(20261202)


def star(cx, cy, r_out, r_in, points, phase=0.0):
    xy = []
    for i in range(2 * points):
        r = r_out if i % 2 == 0 else r_in
        a = phase + math.pi * i / points
        xy += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return xy


def blob(cx, cy, r, n):
    """A random simple polygon: vertices at sorted random angles, random radii (concave)."""
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))
    xy = []
    for a in angles:
        rr = r * rng.uniform(0.3, 1.0)
        xy += [cx + rr * math.cos(a), cy + rr * math.sin(a)]
    return xy


def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


cases = []


def add(name, h, w, polys):
    polys = [[round(float(v), 3) for v in p] for p in polys]
    rles = mask_utils.frPyObjects(polys, h, w)
    merged = mask_utils.merge(rles)
    decoded = mask_utils.decode(merged)
    assert decoded.shape == (h, w)
    cases.append({
        "name": name, "height": h, "width": w, "polygons": polys,
        "counts": merged["counts"].decode("ascii"), "area": int(decoded.sum()),
    })


# Hand-made corners.
add("unit square on pixel edges", 8, 8, [rect(2, 2, 5, 5)])
add("square on pixel centres", 8, 8, [rect(2.5, 2.5, 5.5, 5.5)])
add("half-pixel offsets", 9, 7, [rect(0.5, 1.5, 6.5, 7.5)])
add("whole image", 6, 10, [rect(0, 0, 10, 6)])
add("past every border", 6, 10, [rect(-3, -2, 14, 9)])
add("touching the right and bottom edges", 12, 9, [rect(4, 5, 9, 12)])
add("two overlapping squares (union, not xor)", 16, 16, [rect(2, 2, 10, 10), rect(6, 6, 14, 14)])
add("a polygon inside another of the same object", 16, 16, [rect(1, 1, 15, 15), rect(5, 5, 9, 9)])
add("concave L", 14, 14, [[1, 1, 12, 1, 12, 4, 4, 4, 4, 12, 1, 12]])
add("bow-tie (self-intersecting)", 14, 14, [[1, 1, 12, 12, 12, 1, 1, 12]])
add("sliver thinner than a pixel", 10, 20, [[1, 4.2, 18, 4.4, 18, 4.6, 1, 4.5]])
add("sub-pixel triangle", 6, 6, [[2.1, 2.1, 2.6, 2.2, 2.3, 2.7]])
add("repeated vertices", 12, 12, [[2, 2, 2, 2, 9, 3, 9, 3, 8, 9, 3, 8, 2, 2]])
add("vertical and horizontal edges only", 10, 10, [[1, 1, 8, 1, 8, 3, 5, 3, 5, 8, 1, 8]])
add("star", 24, 24, [star(12, 12, 11, 4, 5)])
add("thin diagonal", 20, 20, [[0, 0, 1, 0, 20, 19, 20, 20, 19, 20, 0, 1]])
add("negative coordinates", 10, 10, [[-4.7, -1.2, 6.3, 2.2, 1.1, 7.9]])

# Random objects: 1–3 polygons each (often overlapping), random image sizes.
for i in range(120):
    h, w = rng.randint(5, 48), rng.randint(5, 48)
    polys = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        cx, cy = rng.uniform(-0.2 * w, 1.2 * w), rng.uniform(-0.2 * h, 1.2 * h)
        r = rng.uniform(0.3, 0.6 * max(h, w))
        kind = rng.random()
        if kind < 0.4:
            p = blob(cx, cy, r, rng.randint(3, 12))
        elif kind < 0.6:
            p = star(cx, cy, r, r * rng.uniform(0.2, 0.8), rng.randint(3, 7), rng.uniform(0, 1))
        elif kind < 0.8:
            x0, y0 = rng.uniform(-2, w), rng.uniform(-2, h)
            p = rect(x0, y0, x0 + rng.uniform(0.2, w), y0 + rng.uniform(0.2, h))
        else:  # vertices snapped to the half-pixel grid
            p = [round(v * 2) / 2 for v in blob(cx, cy, r, rng.randint(3, 8))]
        polys.append(p)
    add(f"random {i}", h, w, polys)

json.dump({"about": "scripts/mask_reference.py (pycocotools frPyObjects + merge + decode)",
           "cases": cases}, __import__("sys").stdout, indent=0)
