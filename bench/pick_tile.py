"""Put the fastest alternative of a tune_prefill.py result into a kernel module's TILE, in place.

python3 bench/pick_tile.py RESULT.json kernels/triton/prefill_experts.py
For one device call that tunes and then tests / times with the winner; the chosen line is printed
(copy it into the source by hand: this edits the copy it runs in)."""

import json
import re
import sys

rows = [r for r in json.load(open(sys.argv[1]))["results"] if "ms" in r]
best = min(rows, key=lambda r: r["ms"])
path = sys.argv[2]
src = open(path).read()
m = re.search(r"^TILE = (\{.*\})$", src, re.M)
tile = eval(m.group(1), {"True": True, "False": False})  # noqa: S307 - our own source line
tile.update({k: best[k] for k in tile if k in best})
line = "TILE = " + json.dumps(tile).replace("true", "True").replace("false", "False")
open(path, "w").write(src[:m.start()] + line + src[m.end():])
print(f"chosen ({best['ms']:.2f} ms, {best['tflops']:.0f} TFLOP/s): {line}")
