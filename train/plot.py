"""Loss curve of a training log: python -m dsv4.train.plot train_log.json loss_curve.png"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_log(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(Path(log_path).read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps, loss = log["steps"], log["loss"]
    k = 20
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, loss, color="#9ecae1", lw=0.6, label="train (per step)")
    ax.plot(steps, smooth, color="#08519c", lw=1.5, label=f"train ({k}-step mean)")
    if log.get("heldout"):
        hs, hv = zip(*log["heldout"])
        ax.plot(hs, hv, "o-", color="#d94801", ms=3, label="held-out")
    stages = log.get("stages") or [{"steps": log.get("total_steps"), "args": log.get("args", {})}]
    start = 0
    for i, st in enumerate(stages):
        n = int(st.get("steps") or 0)
        q = float((st.get("args") or {}).get("qat_from", "nan"))
        if q == q and n:
            ax.axvspan(start + q * n, start + n, color="gray", alpha=0.12,
                       label="QAT (FP8 / MXFP4 forward)" if i == 0 else None)
        if i:
            ax.axvline(start, color="gray", ls="--", lw=0.8, label="stage start" if i == 1 else None)
        start += n
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"built-in model: {log.get('parameters', 0) / 1e6:.1f}M params, seq {log.get('seq_len')}, "
                 f"{log.get('device', '')}", fontsize=9)
    ax.set_ylim(0, max(8.5, min(max(loss), 10)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    plot_log(Path(sys.argv[1]), Path(sys.argv[2]))
