"""Child process of run.py's first-step row, PyTorch's side: the same parts as child_first_step_cnnc.py.

argv[1]: JSON params (see run.row_first_step); prints one JSON line. The imports are timed where they happen (E402).
"""

import json
import sys
import time

p = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch  # noqa: E402
from run import torch_lenet  # noqa: E402

from cnnc_runtime.data import load_dataset, prepare_images  # noqa: E402

t1 = time.perf_counter()
torch.set_num_threads(p["threads"])
mask = torch.tensor(p["mask"]).numpy()
net = torch_lenet(torch, mask)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
t2 = time.perf_counter()
train = load_dataset(p["mnist"])["train"]
x, y = torch.from_numpy(prepare_images(train.x, (1, 32, 32))), torch.from_numpy(train.y)
t3 = time.perf_counter()
idx = torch.randperm(len(x))[:64]
opt.zero_grad()
loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
loss.backward()
opt.step()
loss.item()
t4 = time.perf_counter()
print(json.dumps({"end": time.time(), "import": t1 - t0, "build": t2 - t1, "data": t3 - t2, "step": t4 - t3}))
