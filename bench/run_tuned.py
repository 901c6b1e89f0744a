"""Run a dsv4 command with the fastest settings of a kernel tune applied in-process (no source edit).

python3 bench/run_tuned.py [--gemv TUNE_GEMV.json] [--merge TUNE_MERGE.json] [--mhc TUNE_MHC.json]
    [--attention TUNE_ATTENTION.json] [--experts TUNE_EXPERTS.json] [--set MODULE.TABLE.KEY=JSON]... -- DSV4 ARGS...
python3 bench/run_tuned.py [the same options] --print
--gemv: bench/tune_kernels.py --only gemv output; the alternative with the least time summed over
  the Flash weights (best_gemv), among those within 1e-5 x max|ref| of the reference on every
  weight (the GPU tests' GEMV bound), updates kernels/triton/linear.GEMV.
--merge: bench/tune_kernels.py --only merge output; the fastest merge width updates attention.ATTENTION.
--mhc: bench/tune_prefill.py --only mhc output; the fastest tile within 1e-5 of the reference updates
  mhc.TILE.
--attention: bench/tune_prefill.py --only attention output; the tile with the least time summed over
  CSA, HCA and SWA (an alternative with an error in any is out) updates prefill_attention.TILE. Tiles
  differ in rounding only (the order of the online softmax, bf16 probabilities): the GPU tests bound them.
--experts: bench/tune_prefill.py --only experts output; the fastest tile within 1e-5 of the committed
  one updates prefill_experts.TILE.
--print: print the winners' changes as one '+'-joined setting (bench/compare_prefill.py --compare
  takes it) and exit, running nothing ("base=1" when nothing changes).
--set: one entry of a settings table of dsv4.kernels.triton (an upper-case dict such as linear.GEMV
  or mhc.TILE; the key must exist), the value as JSON, applied after the rest (an A/B of one
  setting): --set linear.GEMV.prefetch_below=12582912 --set mhc.TILE.rows=64.
Prints the settings applied, then runs ``dsv4 ARGS`` (the CLI) in this process. For one device call
that tunes and then measures with the winners; copy the printed settings into the source by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

BOUND = 1e-5  # tests/test_gpu_kernels.py's GEMV bound, x max|reference|


def best_gemv(rows: list[dict]) -> dict:
    """The GEMV alternative (its settings dict) with the least time summed over the weights; a
    weight an alternative has no row for (a tune stopped by its timeout) counts at the defaults'
    time. {} if none ran."""
    meta = ("weight", "N", "K", "us", "GB_per_s", "max_rel_err")
    times, bad = {}, set()
    for r in rows:
        key = json.dumps({k: v for k, v in r.items() if k not in meta}, sort_keys=True)
        times.setdefault(key, {})[r["weight"]] = r["us"]
        if not r.get("max_rel_err", 0.0) <= BOUND:
            bad.add(key)
    base = times.get("{}", {})
    weights = {w for t in times.values() for w in t}
    total = {k: sum(t.get(w, base.get(w, float("inf"))) for w in weights) for k, t in times.items() if k not in bad}
    return json.loads(min(total, key=total.get)) if total else {}


def best_merge(rows: list[dict]) -> dict:
    """ATTENTION update from a --only merge tune: the merge width with the least time summed over
    the entry counts, among those within 1e-5 of the reference."""
    total, bad = {}, set()
    for r in rows:
        total[r["merge"]] = total.get(r["merge"], 0.0) + r["us"]
        if not r.get("rel_err", 1.0) <= 1e-5:
            bad.add(r["merge"])
    ok = {m: t for m, t in total.items() if m not in bad}
    return {"merge": min(ok, key=ok.get)} if ok else {}


def parse_setting(item: str, who: str = "run_tuned: --set") -> tuple[dict, str, object]:
    """'MODULE.TABLE.KEY=JSON' -> (the table dict of dsv4.kernels.triton.MODULE, KEY, the value);
    SystemExit with one line (starting with ``who``) for anything else."""
    import importlib

    name, eq, text = item.partition("=")
    parts = name.split(".")
    if not eq or len(parts) != 3 or not all(parts):
        raise SystemExit(f"{who} wants MODULE.TABLE.KEY=JSON (e.g. mhc.TILE.rows=64), got {item!r}")
    module, table, key = parts
    try:
        mod = importlib.import_module(f"dsv4.kernels.triton.{module}")
    except ImportError:
        raise SystemExit(f"{who}: no kernel module dsv4.kernels.triton.{module}") from None
    settings = getattr(mod, table, None)
    if not (table.isupper() and isinstance(settings, dict)):
        raise SystemExit(f"{who}: {module}.{table} is not a settings table (an upper-case dict)")
    if key not in settings:
        raise SystemExit(f"{who}: {module}.{table} has no key {key!r} (it has {', '.join(settings)})")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"{who} {name}: the value is not JSON: {e}") from None
    if type(value) is not type(settings[key]) and not (isinstance(value, int) and isinstance(settings[key], float)):
        raise SystemExit(f"{who} {name}: {type(settings[key]).__name__} wanted, got {text!r}")
    return settings, key, value


def check_settings(text: str, who: str) -> list[str]:
    """'S1,S2,...' (each VAR=VALUE joined by '+'; a VAR MODULE.TABLE.KEY is a kernel settings table
    entry, any other an environment variable) -> the settings; SystemExit with one line for a bad one
    (before anything slow runs)."""
    settings = text.split(",")
    for st in settings:
        for v in st.split("+"):
            if v.count("=") != 1 or not v.split("=")[0]:
                raise SystemExit(f"{who}: {st!r} is not VAR=VALUE[+VAR=VALUE...]")
            if "." in v.split("=")[0]:
                parse_setting(v, who)
    return settings


@contextlib.contextmanager
def applied(setting: str):
    """Within the block, one checked setting (check_settings) on top of the environment and the
    tables as they were; both restored after."""
    env = dict(os.environ)
    tables = [parse_setting(v) for v in setting.split("+") if "." in v.split("=")[0]]
    kept = [(t, k, t[k]) for t, k, _ in tables]
    os.environ.update(v.split("=") for v in setting.split("+") if "." not in v.split("=")[0])
    for t, k, v in tables:
        t[k] = v
    try:
        yield
    finally:
        for t, k, v in kept:
            t[k] = v
        os.environ.clear()
        os.environ.update(env)


def best_tile(rows: list[dict], table: dict) -> dict:
    """The fastest row of a bench/tune_prefill.py result (within BOUND of the reference, no error),
    as an update of ``table`` (the row's keys that the table has). {} if none qualifies."""
    ok = [r for r in rows if "ms" in r and r.get("max_rel_diff", 1.0) <= BOUND]
    return {k: v for k, v in min(ok, key=lambda r: r["ms"]).items() if k in table} if ok else {}


def best_attention(rows: list[dict], table: dict) -> dict:
    """The prefill attention tile (an update of ``table``) with the least time summed over the
    attention kinds of a tune_prefill --only attention result; {} if none ran for every kind."""
    total, bad, kinds = {}, set(), {r["attn"] for r in rows}
    for r in rows:
        key = json.dumps({k: v for k, v in r.items() if k in table}, sort_keys=True)
        if "ms" not in r:
            bad.add(key)
            continue
        total.setdefault(key, {})[r["attn"]] = r["ms"]
    ok = {k: sum(t.values()) for k, t in total.items() if k not in bad and set(t) == kinds}
    return json.loads(min(ok, key=ok.get)) if ok else {}


def main(argv: list[str]) -> None:
    if "--" not in argv and "--print" not in argv:
        raise SystemExit("usage: run_tuned.py [--gemv FILE] [--merge FILE] [--mhc FILE] [--attention FILE] [--experts FILE] "
                         "[--set MODULE.TABLE.KEY=JSON]... (-- DSV4 ARGS... | --print)")
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemv")
    ap.add_argument("--merge")
    ap.add_argument("--mhc")
    ap.add_argument("--attention")
    ap.add_argument("--experts")
    ap.add_argument("--print", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.TABLE.KEY=JSON",
                    help="one kernel setting, applied last (repeatable), e.g. mhc.TILE.rows=64")
    a = ap.parse_args(argv[:cut])
    from dsv4.kernels.triton import attention, linear, mhc, prefill_attention, prefill_experts

    changed, log = [], sys.stderr if a.print else sys.stdout
    try:
        if a.gemv:
            g = best_gemv(json.load(open(a.gemv))["all"])
            changed += [f"linear.GEMV.{k}={json.dumps(v)}" for k, v in g.items() if linear.GEMV.get(k) != v]
            linear.GEMV.update(g)
            print("GEMV settings:", json.dumps(g), flush=True, file=log)
        if a.merge:
            m = best_merge(json.load(open(a.merge))["all"])
            changed += [f"attention.ATTENTION.{k}={json.dumps(v)}" for k, v in m.items() if attention.ATTENTION[k] != v]
            attention.ATTENTION.update(m)
            print("ATTENTION settings:", json.dumps(m), flush=True, file=log)
        for path, table, name, pick in ((a.mhc, mhc.TILE, "mhc", best_tile),
                                        (a.attention, prefill_attention.TILE, "prefill_attention", best_attention),
                                        (a.experts, prefill_experts.TILE, "prefill_experts", best_tile)):
            if path:
                t = pick(json.load(open(path))["results"], table)
                changed += [f"{name}.TILE.{k}={json.dumps(v)}" for k, v in t.items() if table[k] != v]
                table.update(t)
                print(f"{name}.TILE settings:", json.dumps(t), flush=True, file=log)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"run_tuned: cannot read a tune result: {e}") from None
    for item in a.set:
        table, key, value = parse_setting(item)
        table[key] = value
        changed.append(item)
        print("setting:", item, flush=True, file=log)
    if a.print:
        print("+".join(changed) or "base=1")
        return
    from dsv4.cli.main import app

    sys.argv = ["dsv4", *argv[cut + 1:]]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
