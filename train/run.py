"""Build the built-in default model: data -> tokenizer -> training -> published-layout checkpoint.

    python -m dsv4.train.run --out /tmp/builtin --minutes 7 --device cuda

Seeded (``--seed``); with ``--steps`` instead of ``--minutes`` a run is repeatable step for step on
the same device. Writes into --out: the checkpoint (config.json, sharded safetensors + index,
tokenizer, generation_config.json), heldout.txt (held-out conversations as one text, for
``dsv4 bench perplexity``), train_log.json (losses, settings, data statistics) and loss_curve.png
(when matplotlib is installed). See train/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from dsv4.engine.checkpoint.published import write_published_checkpoint
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.tools.synthetic import random_tensors

from . import data, tokenizer
from .trainer import Capture, lm_losses, lr_at, weights_for_step


def builtin_config(vocab_size: int) -> DSV4Config:
    """~19M parameters; every V4 feature at its real ratios: two SWA layers then CSA/HCA
    alternating (the published pattern), window 128, ratios 4 and 128, hash routing in the first two
    layers, sqrtsoftplus routing after, mHC with 4 streams and 20 Sinkhorn iterations, one MTP layer."""
    return DSV4Config(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, head_dim=128,
        qk_rope_head_dim=64, q_lora_rank=192, o_groups=2, o_lora_rank=128, sliding_window=128,
        compress_ratios=(0, 0, 4, 128, 4, 128), mtp_compress_ratios=(0,), index_n_heads=4, index_head_dim=64,
        index_topk=64, hc_mult=4, hc_sinkhorn_iters=20, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=384, num_hash_layers=2, routed_scaling_factor=1.5,
        max_position_embeddings=65536, yarn_original_max_position=4096, yarn_factor=16.0,
        num_nextn_predict_layers=1)


def pack(convs: list[list[int]], seq_len: int, rng: random.Random) -> list[int]:
    """One training sequence: conversations from a random one on, concatenated, cut to seq_len."""
    out = []
    i = rng.randrange(len(convs))
    while len(out) < seq_len:
        out += convs[i % len(convs)]
        i += 1
    return out[:seq_len]


def heldout_windows(convs: list[list[int]], seq_len: int) -> list[list[int]]:
    flat = [t for c in convs for t in c]
    return [flat[i:i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def plan_steps(args, dev, params, fixed, plain_s: float, elapsed_s: float, budget_s: float) -> int:
    """Steps that fit the rest of the time budget: plain steps cost ``plain_s`` (measured), QAT steps
    add the fake quantisation of every weight (measured here), held-out evaluations ~4 forwards."""
    sync(dev)
    t = time.time()
    reps = 3 if args.qat_from < 1 else 0
    for _ in range(reps):
        with torch.no_grad():
            weights_for_step(params, fixed, True, dev)
    sync(dev)
    qat_extra = (time.time() - t) / max(reps, 1)
    held = 4 * plain_s / 3 / args.held_every  # 4 forwards (~1/3 of a training step each) per held_every steps
    per = (1 - args.qat_from) * (plain_s + qat_extra) + args.qat_from * plain_s + held
    total = max(40, 20 + int((budget_s - elapsed_s - (time.time() - t)) / (per * 1.05)))
    print(f"{plain_s * 1000:.0f} ms/step, QAT +{qat_extra * 1000:.0f} ms -> {total} steps in {args.minutes} min",
          flush=True)
    return total


def main(argv=None) -> None:
    from dsv4.kernels.dispatch import use_backend

    with use_backend("reference"):  # the torch references carry gradients; the GPU kernels do not
        _main(argv)


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0, help="seeds initialisation and the order of training sequences")
    ap.add_argument("--data-seed", type=int, default=0, help="seeds the question phrasings (keep it across stages)")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this checkpoint (its weights and tokenizer) instead of a random init")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --minutes)")
    ap.add_argument("--minutes", type=float, default=7.0,
                    help="wall-time budget of the training loop when --steps is not given: the step count is "
                         "planned from the measured plain and QAT step times, and the loop stops at the budget")
    ap.add_argument("--shard-mb", type=int, default=12, help="largest safetensors shard written (MiB)")
    ap.add_argument("--held-every", type=int, default=100, help="held-out loss every N steps (4 windows)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--qat-from", type=float, default=0.6, help="fraction of steps after which QAT is on")
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--indexer-weight", type=float, default=0.1)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.time()
    train_c, held_c = data.conversations(args.data_seed)
    train_text = [data.render(c) for c in train_c]
    held_text = [data.render(c) for c in held_c]
    if args.init:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(args.init / "tokenizer.json"))
    else:
        tk = tokenizer.train_bpe(train_text, args.vocab)
    enc = lambda texts: [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    train_ids, held_ids = enc(train_text), enc(held_text)
    n_train = sum(map(len, train_ids))
    print(f"{data.describe(train_text, held_text)}\ntokens: train {n_train:,}, held-out {sum(map(len, held_ids)):,} "
          f"({time.time() - t_start:.1f} s)", flush=True)

    cfg = builtin_config(tk.get_vocab_size())
    if args.init:
        from dsv4.engine.checkpoint.published import dequantized, open_checkpoint

        ck = open_checkpoint(args.init)
        if ck.config != cfg:
            raise SystemExit(f"--init {args.init}: its config differs from the built-in model's")
        init = dequantized(ck.load("cpu"))
    else:
        init = random_tensors(cfg, args.seed)
    params = {n: v.to(dev).requires_grad_(True) for n, v in init.items() if v.is_floating_point()}
    fixed = {n: v.to(dev) for n, v in init.items() if not v.is_floating_point()}
    n_params = sum(p.numel() for p in params.values())
    print(f"parameters: {n_params:,}", flush=True)
    decay = [p for n, p in params.items() if p.dim() == 2 and "hc_" not in n]
    other = [p for n, p in params.items() if not (p.dim() == 2 and "hc_" not in n) and not n.endswith("gate.bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    held_windows = heldout_windows(held_ids, args.seq_len)[:4]

    model = Model(cfg, weights_for_step(params, fixed, False, dev), "exact", dev)

    def step_once(qat: bool, seq):
        model.w = weights_for_step(params, fixed, qat, dev)
        ids = torch.tensor(seq, device=dev)
        with Capture() as cap:
            main_loss, mtp_loss = lm_losses(model, ids, args.mtp_weight)
            idx_loss = cap.indexer_loss().to(dev)
        return main_loss, mtp_loss, idx_loss, cap

    def held_loss(qat: bool) -> float:
        with torch.no_grad():
            vals = [step_once(qat, seq=w)[0].item() for w in held_windows]
        return sum(vals) / len(vals)

    total = args.steps
    log = {"steps": [], "loss": [], "mtp_loss": [], "indexer_loss": [], "heldout": []}
    if args.init and (args.init / "train_log.json").exists():  # one curve across stages
        prev = json.loads((args.init / "train_log.json").read_text())
        log = {k: prev.get(k, []) for k in log}
        log["stages"] = prev.get("stages", [{"steps": prev.get("total_steps"), "args": prev.get("args")}])
    base = len(log["loss"])
    t0 = time.time()
    step = 0
    budget_s = args.minutes * 60 if args.steps is None else float("inf")
    t_calib = None
    stopped_early = False
    while True:
        if total is None and step == 5:
            sync(dev)
            t_calib = time.time()
        if total is None and step == 20:
            total = plan_steps(args, dev, params, fixed, (time.time() - t_calib) / 15, time.time() - t0, budget_s)
        planned = total if total is not None else 10 ** 9
        if step >= planned:
            break
        if time.time() - t0 > budget_s:  # the plan was optimistic: stop at the budget, keep what was learned
            print(f"time budget reached at step {step} of {planned}", flush=True)
            stopped_early, total = True, step
            break
        qat = total is not None and step >= args.qat_from * total
        lr = lr_at(step, total or 5000, args.lr, warmup=100)
        for g in opt.param_groups:
            g["lr"] = lr
        main_loss, mtp_loss, idx_loss, cap = step_once(qat, seq=pack(train_ids, args.seq_len, rng))
        loss = main_loss + args.mtp_weight * mtp_loss + args.indexer_weight * idx_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params.values()], 1.0)
        opt.step()
        cap.balance_bias(cfg.n_routed_experts, 1e-3)
        log["steps"].append(base + step)
        log["loss"].append(main_loss.item())
        log["mtp_loss"].append(mtp_loss.item())
        log["indexer_loss"].append(idx_loss.item())
        if step % args.held_every == 0 or step == planned - 1:
            h = held_loss(qat)
            log["heldout"].append([base + step, h])
            print(f"step {step}/{planned} loss {main_loss.item():.3f} mtp {mtp_loss.item():.3f} "
                  f"idx {idx_loss.item():.3f} held-out {h:.3f} lr {lr:.2e} qat {qat} "
                  f"{time.time() - t0:.0f}s", flush=True)
        step += 1
    train_s = time.time() - t0

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    final = {n: p.detach().float().cpu() for n, p in params.items()}
    final.update({n: v.cpu() for n, v in fixed.items()})
    write_published_checkpoint(cfg, out, tensors=final, max_shard_bytes=args.shard_mb << 20, tokenizer=False)
    tokenizer.save(tk, out, cfg.max_position_embeddings)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
         "temperature": 0.3, "top_p": 0.9}))
    # held-out text for `dsv4 bench perplexity` (which prepends bos itself)
    bos = "<｜begin▁of▁sentence｜>"
    (out / "heldout.txt").write_text("".join(held_text)[len(bos):])
    log.update({"config": cfg.to_dict(), "parameters": n_params, "args": {k: str(v) for k, v in vars(args).items()},
                "train_tokens": n_train, "seq_len": args.seq_len, "total_steps": base + total,
                "stopped_at_budget": stopped_early, "data_seconds": t0 - t_start,
                "train_seconds": train_s, "tokens_seen": (base + total) * args.seq_len, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "torch": torch.__version__, "python_stdlib_version": __import__("sys").version.split()[0]})
    log.setdefault("stages", []).append({"steps": total, "args": log["args"], "train_seconds": train_s})
    (out / "train_log.json").write_text(json.dumps(log))
    try:
        from .plot import plot_log

        plot_log(out / "train_log.json", out / "loss_curve.png")
    except ImportError:
        print("matplotlib not installed: no loss_curve.png (python -m dsv4.train.plot LOG PNG makes it)")
    print(f"wrote {out} ({train_s:.0f} s of training, {total} steps)")


if __name__ == "__main__":
    main()
