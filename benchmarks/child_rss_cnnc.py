"""Child process of run.py's RSS rows, cnnc's side: LeNet-5 trained on all of MNIST kept uint8 as stored.

argv[1]: JSON params (see run.row_rss); prints one JSON line of peaks (MiB), steps and seconds.
"""

import json
import sys
import time

from rss import peak, reset_peak, status

import cnnc
from cnnc_runtime.data import load_dataset

p = json.loads(sys.argv[1])
model = cnnc.compile(p["lenet"])
train = load_dataset(p["mnist"], raw=True)["train"]  # uint8 (60000, 28, 28), as stored
x, y = train.x, train.y  # fit scales, pads and normalizes each batch
load_peak, before = peak(), status("VmRSS")
reset = reset_peak()
t0 = time.perf_counter()
h = model.fit(x, y, epochs=1, batch=64, max_steps=p["steps"], progress=False)
train_peak = peak()
print(json.dumps({"load_peak": load_peak, "before": before, "train_peak": train_peak if reset else None,
                  "peak": max(load_peak, train_peak), "steps": h.epochs[-1].steps,
                  "seconds": time.perf_counter() - t0}))
