#!/usr/bin/env python3
"""Reference bytes for pali's TensorBoard event files, encoded by the tensorboard package itself.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install tensorboard
    /tmp/pyref/bin/python scripts/tensorboard_reference.py tests/fixtures/tensorboard
    /tmp/pyref/bin/python scripts/tensorboard_reference.py --read RUN_DIR   # any pali run

Writes `events.json` (the events: kind, wall time, step, scalars) and `reference.tfevents` (the
same events as tensorboard's `event_pb2.Event` protobufs framed by its `RecordWriter`); the Rust
test encodes events.json and compares bytes. `--read` loads a run's event files with
tensorboard's own `EventFileLoader` and prints each scalar series' length and last value.
"""
import glob
import json
import os
import sys

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

if sys.argv[1] == "--read":
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    series = {}
    for path in sorted(glob.glob(os.path.join(sys.argv[2], "**", "events.out.tfevents.*"), recursive=True)):
        for e in EventFileLoader(path).Load():
            for v in e.summary.value:
                series.setdefault(v.tag, []).append((e.step, v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]))
    for tag, pts in sorted(series.items()):
        print(f"{tag}: {len(pts)} points, last step {pts[-1][0]} = {pts[-1][1]:.6g}")
    sys.exit(0)

out = sys.argv[1]
events = [
    {"kind": "file_version", "wall_time": 1764700000.25},
    {"kind": "scalars", "wall_time": 1764700001.5, "step": 1,
     "values": [["loss", 8.373125], ["lr/multi_modal_projector\\..*", 0.003], ["grad_norm", 12.5]]},
    {"kind": "scalars", "wall_time": 1764700002.125, "step": 2,
     "values": [["loss", 7.0], ["eval/cider", -0.0], ["val_perplexity/synth:vqa", 1.75]]},
    {"kind": "scalars", "wall_time": 1764700003.0, "step": 0, "values": [["x", -2.5]]},
    {"kind": "start", "wall_time": 1764700004.0, "step": 300},
    {"kind": "scalars", "wall_time": 1764700005.0, "step": 123456789012,
     "values": [["tokens_per_s", 1234.5678]]},
]
with open(os.path.join(out, "events.json"), "w") as f:
    json.dump({"about": "scripts/tensorboard_reference.py", "events": events}, f, indent=1)
w = RecordWriter(open(os.path.join(out, "reference.tfevents"), "wb"))
for e in events:
    ev = event_pb2.Event(wall_time=e["wall_time"], step=e.get("step", 0))
    if e["kind"] == "file_version":
        ev.file_version = "brain.Event:2"
    elif e["kind"] == "start":
        ev.session_log.status = event_pb2.SessionLog.START
    else:
        ev.summary.CopyFrom(summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in e["values"]]))
    w.write(ev.SerializeToString())
w.close()
