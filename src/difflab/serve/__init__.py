"""``difflab serve``: a local web page over pipelines (gradio), and the runs behind it.

:mod:`difflab.serve.runs` generates, previews, cancels and records without any web framework;
:mod:`difflab.serve.app` lays the page and the JSON API over it; :func:`serve` checks everything
(the folders are pipelines that load, the port is free) before it starts anything.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difflab.serve.runs import (
    MAX_IMAGES,
    SERVE_REQUEST,
    Cancelled,
    Request,
    RequestError,
    Run,
    RunControl,
    Served,
    ServeError,
    compare,
    generate,
    load_served,
    parse_request,
    request_from_settings,
    store_input,
)

LOCALHOST = "127.0.0.1"


def check_port(host: str, port: int) -> None:
    """A :class:`ServeError` when ``port`` cannot be bound on ``host`` (in use, or not allowed)."""
    if not 0 < port < 65536:
        raise ServeError(f"--port must be from 1 to 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as the server does, so connections closed a moment ago do not count
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServeError(f"cannot listen on {host}:{port} ({err.strerror}): another program uses the port; "
                             "choose another with --port") from None


def start(paths: Sequence[str | Path], *, host: str = LOCALHOST, port: int = 7860, concurrency: int = 1,
          out_dir: str | Path | None = None, block: bool = True, quiet: bool = False,
          loras: Sequence[str | Path] = (), controlnets: Sequence[str | Path] = ()) -> tuple[Any, str]:
    """Load the pipelines (with the LoRA and ControlNet folders, each on the pipeline it was trained
    on), check the port, then serve the page; returns ``(app, url)`` (with ``block=False`` the
    server runs in the background until ``app.close()``). Nothing starts if anything is wrong: a
    :class:`ServeError` says what."""
    if concurrency < 1:
        raise ServeError(f"--concurrency must be at least 1, got {concurrency}")
    served = load_served(paths, loras=loras, controlnets=controlnets)
    check_port(host, port)
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="difflab-serve-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    import gradio as gr

    from difflab.serve.app import CSS, build_app

    app = build_app(served, out_dir, concurrency=concurrency)
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, ssr_mode=False,
                               theme=theme, css=CSS, footer_links=["api"], show_error=True,
                               allowed_paths=[str(out_dir)],
                               quiet=quiet, inbrowser=False, share=False)
    except OSError as err:
        raise ServeError(f"cannot start the server on {host}:{port}: {err}") from None
    if block:
        print(f"difflab serve: {', '.join(served)} at {url} (images in {out_dir}); Ctrl-C stops", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return app, url


__all__ = ["LOCALHOST", "MAX_IMAGES", "SERVE_REQUEST", "Cancelled", "Request", "RequestError", "Run", "RunControl",
           "ServeError", "Served", "check_port", "compare", "generate", "load_served", "parse_request",
           "request_from_settings", "start", "store_input"]
