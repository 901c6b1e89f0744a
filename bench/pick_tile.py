"""Put the winner of a tune_prefill.py result into a kernel module's TILE, in place.

python3 bench/pick_tile.py RESULT.json kernels/triton/prefill_experts.py
The winner is chosen as bench/run_tuned.py chooses it: for an attention tune (rows with "attn") the
tile with the least time summed over CSA, HCA and SWA (best_attention), else the fastest row within
1e-5 of the reference (best_tile). The module's ``TILE = {...}`` assignment (one or more lines) is
rewritten with the winner's values and the chosen line is printed. For one device call that tunes and
then tests / times with the winner: this edits the copy it runs in (copy the line into the source).
"""

import ast
import json
import sys

from run_tuned import best_attention, best_tile  # bench/, this script's folder


def _tile_assignment(src: str):
    """-> (first line index, end line index, the TILE dict) of the module-level ``TILE = {...}``."""
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TILE"]:
            return node.lineno - 1, node.end_lineno, ast.literal_eval(node.value)
    return None


def _format(tile: dict, width: int = 120) -> list[str]:
    """``TILE = {...}`` wrapped at ``width`` columns, continuation lines indented 8."""
    items = [f"{json.dumps(k)}: {v!r}" for k, v in tile.items()]
    lines, cur = [], "TILE = {"
    for i, it in enumerate(items):
        piece = it + ("}" if i == len(items) - 1 else ",")
        if len(cur) + len(piece) + 1 > width and not cur.endswith("{"):
            lines.append(cur)
            cur = " " * 8 + piece
        else:
            cur += ("" if cur.endswith("{") else " ") + piece
    return lines + [cur]


def main(argv: list[str]) -> str:
    if len(argv) != 2:
        raise SystemExit("usage: pick_tile.py RESULT.json MODULE.py")
    try:
        rows = json.load(open(argv[0]))["results"]
        src = open(argv[1]).read()
        found = _tile_assignment(src)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as e:
        raise SystemExit(f"pick_tile: cannot read the inputs: {e}") from None
    if found is None:
        raise SystemExit(f"pick_tile: no TILE assignment in {argv[1]}")
    first, end, tile = found
    best = (best_attention if any("attn" in r for r in rows) else best_tile)(rows, tile)
    if not best:
        raise SystemExit(f"pick_tile: no alternative in {argv[0]} ran within the bound")
    tile.update(best)
    text = _format(tile)
    lines = src.splitlines(keepends=True)
    with open(argv[1], "w") as f:
        f.write("".join(lines[:first]) + "\n".join(text) + "\n" + "".join(lines[end:]))
    return "chosen: " + " ".join(t.strip() for t in text)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
