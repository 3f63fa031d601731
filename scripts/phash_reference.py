"""Reference perceptual hashes for the near-duplicate filter (crates/data-mixture/src/dedup.rs).

Computes imagehash's DCT pHash (imagehash 4.3, Pillow, scipy) of the fixture images and writes
tests/fixtures/phash/reference.json: per file the 64 bits as an integer whose bit i is element i
of the row-major 8×8 low-frequency block (pali's convention; imagehash prints the first element
as the most significant bit). Also writes a JPEG (quality 50) re-encode of the first image, a
near-duplicate.

    python -m venv /tmp/pyref && /tmp/pyref/bin/pip install imagehash pillow numpy scipy
    /tmp/pyref/bin/python scripts/phash_reference.py
"""
import json
import pathlib

import imagehash
from PIL import Image

root = pathlib.Path(__file__).resolve().parent.parent
d = root / "tests/fixtures/phash"
Image.open(d / "000000.png").convert("RGB").save(d / "000000-q50.jpg", quality=50)
files = sorted(p for p in d.iterdir() if p.suffix in (".png", ".jpg"))
files.append(root / "tests/fixtures/tiny-gemma1/image.png")
out = {}
for p in files:
    bits = imagehash.phash(Image.open(p)).hash.flatten()
    out[str(p.relative_to(root))] = sum(1 << i for i, b in enumerate(bits) if b)
(d / "reference.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
