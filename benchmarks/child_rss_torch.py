"""Child process of run.py's RSS rows, PyTorch's side: the same training as torchvision's MNIST pipeline does it.

argv[1]: JSON params (see run.row_rss); prints one JSON line of peaks (MiB), steps and seconds.
"""

import json
import sys
import time

import numpy as np
import torch
from rss import peak, reset_peak, status
from run import torch_lenet

from cnnc_runtime.data import load_dataset

p = json.loads(sys.argv[1])
torch.set_num_threads(p["threads"])
net = torch_lenet(torch, np.asarray(p["mask"], np.float32))
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
train = load_dataset(p["mnist"], raw=True)["train"]
# uint8 (60000, 28, 28) as torchvision's MNIST keeps it; each batch: ToTensor (/255), Pad(2), Normalize
x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
mean, std = p["normalize"]["mean"], p["normalize"]["std"]


def batch(idx):
    xb = torch.nn.functional.pad(x[idx].unsqueeze(1).float().div_(255), (2, 2, 2, 2))
    return xb.sub_(mean).div_(std)


load_peak, before = peak(), status("VmRSS")
reset = reset_peak()
order = torch.randperm(len(x))
t0, done = time.perf_counter(), 0
for s in range(p["steps"]):
    if time.perf_counter() - t0 > p["max_seconds"]:
        break
    done += 1
    idx = order[s * 64:(s + 1) * 64]
    opt.zero_grad(set_to_none=True)
    out = net(batch(idx))
    loss = torch.nn.functional.cross_entropy(out, y[idx])
    loss.backward()
    opt.step()
    loss.item()
    int((out.argmax(1) == y[idx]).sum())
train_peak = peak()
print(json.dumps({"load_peak": load_peak, "before": before, "train_peak": train_peak if reset else None,
                  "peak": max(load_peak, train_peak), "steps": done, "seconds": time.perf_counter() - t0}))
