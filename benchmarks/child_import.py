"""Child process of run.py's import row: the seconds `import MODULE` takes in a fresh interpreter.

argv[1]: JSON {"module": NAME}; prints one JSON line {"seconds": ...}.
"""

import json
import sys
import time

p = json.loads(sys.argv[1])
t0 = time.perf_counter()
__import__(p["module"])
print(json.dumps({"seconds": time.perf_counter() - t0}))
