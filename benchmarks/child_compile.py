"""Child process of run.py's compile rows: `import cnnc`, then `cnnc.compile` of a file twice, each timed.

argv[1]: JSON {"path": FILE, "cache": bool, "numpy_first": bool (optional)}; prints one JSON line.
The imports are timed where they happen, hence below the code (E402).
"""

import json
import sys
import time

p = json.loads(sys.argv[1])
if p.get("numpy_first"):
    import numpy  # noqa: F401 - as a script that makes its inputs has done before it compiles
t0 = time.perf_counter()
import cnnc  # noqa: E402

t1 = time.perf_counter()
m = cnnc.compile(p["path"], cache=p["cache"])
t2 = time.perf_counter()
m = cnnc.compile(p["path"], cache=p["cache"])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "compile": t2 - t1, "again": t3 - t2}))
