"""Shared CLI plumbing: one-line errors, model resolution, device choice."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def fail(msg: str, code: int = 2):
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_precision(precision: str) -> None:
    if precision not in ("exact", "faithful"):
        raise UserError(f"--precision {precision!r}: use exact or faithful")


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return device


def builtin_model_dir() -> Path:
    """The built-in default model shipped inside the package (engine/builtin): a 25M-parameter
    DeepSeek-V4 trained on Python standard-library documentation (see train/README.md)."""
    from dsv4 import engine

    d = Path(engine.__file__).parent / "builtin"
    if not (d / "config.json").exists():
        raise UserError(f"{d}: the built-in model's files are missing from this install (reinstall dsv4, "
                        "or pass --model DIR)")
    return d


def guard(fn):
    """Run a command body, turning known errors into one-line messages (exit 2)."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*a, **kw):
        from dsv4.cache import CacheError
        from dsv4.engine.checkpoint.published import CheckpointError
        from dsv4.engine.model.config import ConfigError
        from dsv4.engine.runtime.tokenizer import TokenizerError

        try:
            return fn(*a, **kw)
        except (UserError, CheckpointError, ConfigError, TokenizerError, CacheError) as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"{e.filename}: no such file or directory")
        except KeyboardInterrupt:
            sys.stderr.write("\ninterrupted\n")
            raise typer.Exit(130)

    return wrapper
