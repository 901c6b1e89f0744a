"""The ``dsv4`` command: chat, convert, bench, inspect-cache."""

from __future__ import annotations

import typer

from . import bench, chat, convert, inspect_cache, plan
from .common import Command, Group

app = typer.Typer(
    name="dsv4", cls=Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Run DeepSeek-V4 (Flash and Pro) on your own machine.",
)
app.command("chat", help=chat.HELP, cls=Command)(chat.chat)
app.command("convert", help=convert.HELP, cls=Command)(convert.convert)
app.command("inspect-cache", help=inspect_cache.HELP, cls=Command)(inspect_cache.inspect_cache)
app.add_typer(bench.app, name="bench")
app.command("plan", help=plan.HELP, cls=Command)(plan.plan)

if __name__ == "__main__":
    app()
