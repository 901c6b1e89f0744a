"""The ``dsv4`` command: chat, convert, bench, inspect-cache."""

from __future__ import annotations

import typer

from . import bench, chat, convert, inspect_cache

app = typer.Typer(
    name="dsv4", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Run DeepSeek-V4 (Flash and Pro) on your own machine.",
)
app.command("chat", help=chat.HELP)(chat.chat)
app.command("convert", help=convert.HELP)(convert.convert)
app.command("inspect-cache", help=inspect_cache.HELP)(inspect_cache.inspect_cache)
app.add_typer(bench.app, name="bench")

if __name__ == "__main__":
    app()
