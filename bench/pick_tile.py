"""Put the fastest alternative of a tune_prefill.py result into a kernel module's TILE, in place.

python3 bench/pick_tile.py RESULT.json kernels/triton/prefill_experts.py
For one device call that tunes and then tests / times with the winner; the chosen line is printed
(copy it into the source by hand: this edits the copy it runs in)."""

import ast
import json
import re
import sys


def main(argv: list[str]) -> str:
    if len(argv) != 2:
        raise SystemExit("usage: pick_tile.py RESULT.json MODULE.py")
    try:
        rows = [r for r in json.load(open(argv[0]))["results"] if "ms" in r]
        src = open(argv[1]).read()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"pick_tile: cannot read the inputs: {e}") from None
    m = re.search(r"^TILE = (\{.*\})$", src, re.M)
    if not rows:
        raise SystemExit(f"pick_tile: no alternative ran in {argv[0]}")
    if m is None:
        raise SystemExit(f"pick_tile: no TILE line in {argv[1]}")
    best = min(rows, key=lambda r: r["ms"])
    tile = ast.literal_eval(m.group(1))
    tile.update({k: best[k] for k in tile if k in best})
    line = "TILE = " + json.dumps(tile).replace("true", "True").replace("false", "False")
    with open(argv[1], "w") as f:
        f.write(src[:m.start()] + line + src[m.end():])
    return f"chosen ({best['ms']:.2f} ms, {best['tflops']:.0f} TFLOP/s): {line}"


if __name__ == "__main__":
    print(main(sys.argv[1:]))
