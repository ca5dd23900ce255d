"""Child process of run.py's compile rows: what `import numpy` and `import llvmlite.binding` cost alone.

Prints one JSON line {"numpy": s, "llvmlite": s}; the imports are timed where they happen (E402).
"""

import json
import time

t0 = time.perf_counter()
import numpy  # noqa: E402, F401

t1 = time.perf_counter()
import llvmlite.binding  # noqa: E402, F401

t2 = time.perf_counter()
print(json.dumps({"numpy": t1 - t0, "llvmlite": t2 - t1}))
