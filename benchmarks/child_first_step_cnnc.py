"""Child process of run.py's first-step row, cnnc's side: import, build LeNet-5 (warm cache), load MNIST, one step.

argv[1]: JSON params (see run.row_first_step); prints one JSON line with each part's seconds. The imports are
timed where they happen (E402). The images go to fit as the network's input (an ``Inputs`` without the file's
normalize), as the PyTorch side takes them.
"""

import json
import sys
import time

p = json.loads(sys.argv[1])
t0 = time.perf_counter()
import cnnc  # noqa: E402
from cnnc_runtime.data import load_dataset, prepare_images  # noqa: E402
from cnnc_runtime.inputs import Inputs  # noqa: E402

t1 = time.perf_counter()
model = cnnc.compile(p["lenet"])
t2 = time.perf_counter()
train = load_dataset(p["mnist"])["train"]
x, y = prepare_images(train.x, model.input_shape), train.y
t3 = time.perf_counter()
model.fit(Inputs(x, model.input_shape), y, epochs=1, batch=64, max_steps=1, progress=False)
t4 = time.perf_counter()
print(json.dumps({"end": time.time(), "import": t1 - t0, "build": t2 - t1, "data": t3 - t2, "step": t4 - t3}))
