#!/usr/bin/env python3
"""Reference numbers for pali's evaluators, computed by the reference Python packages.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install pycocoevalcap==1.2 pycocotools==2.0.11 numpy
    /tmp/pyref/bin/python scripts/eval_reference.py > tests/fixtures/eval/reference.json

Needs `java` on PATH (pycocoevalcap's PTB tokenizer is Stanford CoreNLP). The inputs are built
here from a fixed seed and stored next to the outputs, so the Rust tests need no Python:

- captions: PTB tokenisation of every string, corpus BLEU-1..4 and CIDEr-D (pycocoevalcap);
- detection: COCO bbox mAP@[.5:.95] and mAP50 (pycocotools COCOeval, the default parameters);
  predicted boxes lie on the location-token grid, so they can be written as `<loc…>` text;
- masks: COCO RLE strings, their areas, and the IoU of each with a predicted box filled in
  (pycocotools.mask), the box turned into pixels as big_vision's segmentation evaluator does.
"""
import contextlib
import io
import json
import random

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

rng = random.Random(20261127)

# ---------------------------------------------------------------- captions
SUBJECTS = ["a man", "a woman", "two dogs", "the cat", "a red car", "people", "a child",
            "an old bus", "three birds", "a large brown bear", "some kids", "a train"]
VERBS = ["is sitting on", "stands next to", "runs across", "is parked near", "looks at",
         "flies over", "is eating", "plays with", "rides", "waits beside"]
OBJECTS = ["a bench", "the street", "a grassy field", "the water", "a table",
           "a wooden fence", "the beach", "a pizza", "a frisbee", "the station"]
TAILS = ["", ".", " .", " in the park.", ", smiling!", " at night", " (in the rain)",
         " on a sunny day.", "; it's cold", " - very fast", " \"happily\"", "..."]

# Strings that exercise the tokenizer's corners, used as references and predictions.
TRICKY = [
    "A man's dog doesn't like the cat's toy.",
    "It's 3:30 p.m. and the U.S. flag is up!",
    "Black-and-white photo of a 1950s car (vintage).",
    "She said \"hello\" -- then left...",
    "Two people, a dog & a cat; all on the sofa?",
    "The price is $3.50, isn't it?",
    "A close-up of a hot-dog with ketchup/mustard.",
    "They're playing frisbee at the park's edge.",
    "I can't see the 'sign' clearly",
    "A 10-year-old boy's bike, e.g. a BMX.",
    "Several cars parked along the road ; some are red",
    "A woman holding an umbrella [black] in the snow",
    "Kids    playing   soccer",
    "The man wouldn't go, he'd rather stay.",
    "A plate with 2 eggs, bacon and toast: breakfast!",
    "A sign reading 'STOP' at the corner.",
    "Dogs' toys are on the floor",
    "Mr. Smith's house at 5 a.m.",
    "A cat sits on a laptop keyboard.",
    "Cannot (or won't) eat the cake: 100% sure",
]


def sentence():
    s = rng.choice(SUBJECTS) + " " + rng.choice(VERBS) + " " + rng.choice(OBJECTS) + rng.choice(TAILS)
    return s[0].upper() + s[1:] if rng.random() < 0.5 else s


captions = []
for i in range(40):
    refs = [sentence() for _ in range(5)]
    if i < len(TRICKY):
        refs[rng.randrange(5)] = TRICKY[i]
    r = rng.random()
    if r < 0.2:
        pred = refs[0]
    elif r < 0.4 and i < len(TRICKY):
        pred = TRICKY[(i + 3) % len(TRICKY)]
    elif r < 0.5:
        pred = rng.choice(SUBJECTS)
    else:
        pred = sentence()
    captions.append({"id": f"img{i:03d}", "prediction": pred, "references": refs})

gts = {c["id"]: [{"caption": r} for r in c["references"]] for c in captions}
res = {c["id"]: [{"caption": c["prediction"]}] for c in captions}
tok = PTBTokenizer()
with contextlib.redirect_stdout(io.StringIO()):
    gts_t = tok.tokenize(gts)
    res_t = tok.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    cider, cider_per = Cider().compute_score(gts_t, res_t)

ptb = {}
for c in captions:
    ptb[c["prediction"]] = res_t[c["id"]][0]
    for r, t in zip(c["references"], gts_t[c["id"]]):
        ptb[r] = t
caption_out = {
    "examples": captions,
    "ptb": [{"text": k, "tokens": v} for k, v in ptb.items()],
    "bleu": list(bleu),
    "cider": float(cider),
    "cider_per_example": [float(x) for x in cider_per],
}

# ---------------------------------------------------------------- detection
LABELS = ["cat", "dog", "car", "person"]
images, anns, dets, det_examples = [], [], [], []
ann_id = 1
for i in range(30):
    w, h = rng.randint(200, 640), rng.randint(200, 640)
    images.append({"id": i + 1, "width": w, "height": h})
    boxes, labels, preds = [], [], []
    for _ in range(rng.randint(0, 5)):
        bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = [round(x0, 2), round(y0, 2), round(x0 + bw, 2), round(y0 + bh, 2)]
        label = rng.choice(LABELS[:3])  # "person" never appears in the ground truth
        boxes.append(box)
        labels.append(label)
        anns.append({"id": ann_id, "image_id": i + 1, "category_id": LABELS.index(label) + 1,
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                     "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        ann_id += 1
        if rng.random() < 0.8:  # a detection near this box
            j = [rng.gauss(0, 0.08) * (bw if k % 2 == 0 else bh) for k in range(4)]
            p = [box[0] + j[0], box[1] + j[1], box[2] + j[2], box[3] + j[3]]
            p = [min(max(p[0], 0), w), min(max(p[1], 0), h), min(max(p[2], 0), w), min(max(p[3], 0), h)]
            plabel = label if rng.random() < 0.85 else rng.choice(LABELS)
            preds.append((p, plabel, round(rng.choice([1.0, 0.9, rng.random()]), 3)))
    for _ in range(rng.randint(0, 2)):  # false positives
        bw, bh = rng.uniform(8, w / 3), rng.uniform(8, h / 3)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        preds.append(([x0, y0, x0 + bw, y0 + bh], rng.choice(LABELS), round(rng.random(), 3)))
    rng.shuffle(preds)
    # Snap predicted boxes to the location-token grid (k / 1023 of the image size), so a
    # prediction written as `<loc…>` tokens decodes to exactly these pixels.
    snap = lambda v, size: round(v / size * 1023) / 1023 * size
    preds = [([snap(p[0], w), snap(p[1], h), snap(p[2], w), snap(p[3], h)], l, s) for p, l, s in preds]
    for p, label, score in preds:
        dets.append({"image_id": i + 1, "category_id": LABELS.index(label) + 1,
                     "bbox": [p[0], p[1], p[2] - p[0], p[3] - p[1]], "score": score})
    det_examples.append({"id": f"det{i:03d}", "width": w, "height": h, "boxes": boxes, "labels": labels,
                         "predictions": [{"box": p, "label": l, "score": s} for p, l, s in preds]})

coco = COCO()
coco.dataset = {"images": images, "annotations": anns,
                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(LABELS)]}
with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
    coco_dt = coco.loadRes(dets)
    ev = COCOeval(coco, coco_dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
det_out = {"examples": det_examples, "map": float(ev.stats[0]), "map50": float(ev.stats[1]),
           "map75": float(ev.stats[2])}

# ---------------------------------------------------------------- masks
mask_cases = []
for i in range(12):
    h, w = rng.randint(20, 90), rng.randint(20, 90)
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    for _ in range(rng.randint(1, 3)):  # a few rectangles and a disc
        y0, x0 = rng.randrange(h), rng.randrange(w)
        m[y0:y0 + rng.randint(1, h), x0:x0 + rng.randint(1, w)] = 1
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 15)
    m[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    if i == 0:
        m[:] = 0
    rle = mask_utils.encode(np.asfortranarray(m))
    # A predicted box as PaliGemma writes it (y_min x_min y_max x_max in 0..1023), turned into
    # pixels the way big_vision's segmentation evaluator does: int(coord / 1023 * size).
    y1, x1 = rng.randrange(0, 600), rng.randrange(0, 600)
    loc = [y1, x1, rng.randrange(y1 + 1, 1024), rng.randrange(x1 + 1, 1024)]
    py1, px1, py2, px2 = (int(loc[0] / 1023 * h), int(loc[1] / 1023 * w),
                          int(loc[2] / 1023 * h), int(loc[3] / 1023 * w))
    bm = np.zeros((h, w), dtype=np.uint8, order="F")
    bm[py1:py2, px1:px2] = 1
    brle = mask_utils.encode(np.asfortranarray(bm))
    iou = mask_utils.iou([brle], [rle], [0])[0][0] if py2 > py1 and px2 > px1 else 0.0
    mask_cases.append({"size": [h, w], "counts": rle["counts"].decode(),
                       "area": int(mask_utils.area(rle)), "loc": loc,
                       "box_mask_counts": brle["counts"].decode(), "iou_box_vs_mask": float(iou)})

print(json.dumps({"caption": caption_out, "detection": det_out, "masks": mask_cases}, indent=1))
