"""`diffgentor dashboard [--host H] [--port P] [--allow-actions]`: serve the dashboard with uvicorn.

The options are added by `add_arguments` (api_client/cli.py creates the sub-command); nothing
here imports Starlette or uvicorn before the command runs, so the CLI works without the extra.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from typing import Any

from api_client.dashboard.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MIN_TOKEN_LENGTH,
    TOKEN_ENV,
    DashboardConfig,
    token_from_env,
)
from api_client.errors import ConfigurationError

EXTRA_MODULES = ("starlette", "jinja2", "uvicorn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; any other than loopback needs {TOKEN_ENV})",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--allow-actions",
        dest="allow_actions",
        action="store_true",
        help=f"offer cancel and retry of jobs and batches (needs {TOKEN_ENV}, at least {MIN_TOKEN_LENGTH} characters)",
    )


def check_extra() -> None:
    """Raise `ConfigurationError` (exit 4) naming the extra when Starlette, Jinja2 or uvicorn is missing."""
    import importlib.util

    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigurationError(
            f"`diffgentor dashboard` needs {', '.join(missing)}: install `diffgentor[dashboard]`"
        )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from api_client.client import DiffgentorClient

    config = DashboardConfig(
        host=args.host, port=args.port, token=token_from_env(), allow_actions=args.allow_actions
    ).check()
    check_extra()
    client = DiffgentorClient.from_env()
    from api_client.dashboard.app import Services, create_app

    services = Services.from_client(client)  # the database (migrated when SQLite) and storage, checked
    app = create_app(config, services)
    listener = bind(config.host, config.port)
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    mode = "cancel and retry enabled" if config.allow_actions else "read-only"
    login = f"; log in with {TOKEN_ENV}" if config.token else ""
    print(f"dashboard on http://{shown}:{port}/ ({mode}{login}); Ctrl-C stops it", flush=True)
    settle_heap()
    try:
        run_server(app, listener)
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        pass
    finally:
        services.close()
    print("dashboard stopped", flush=True)
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or `ConfigurationError` naming the address (port in use, bad host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host/--port"
        ) from None
    listener.set_inheritable(True)
    return listener


def settle_heap() -> None:
    """Move what start-up allocated (libraries, templates, engines) out of the garbage collector's
    way, so a collection during a request scans only what requests made: a page of 1,000 batches
    allocates about 100,000 objects, and collections over the whole heap made its slowest tenth
    about 40 % slower (bench/dashboard.py calls this too)."""
    import gc

    gc.collect()
    gc.freeze()


def _server(app: Any) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",  # the app has no startup or shutdown work
        server_header=False,
        proxy_headers=True,  # X-Forwarded-Proto/For from a proxy on this host only (uvicorn's default trust)
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def run_server(app: Any, listener: socket.socket) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn's own signal handling)."""
    _server(app).run(sockets=[listener])


class BackgroundServer:
    """The dashboard on a thread of this process (tests, benchmarks): `url`, then `stop()`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.listener = bind(host, port)
        address = self.listener.getsockname()
        self.url = f"http://{address[0]}:{address[1]}"
        self.server = _server(app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.listener]}, name="dashboard", daemon=True
        )

    def start(self, timeout: float = 15.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.listener.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `diffgentor dashboard` is the way in
    parser = argparse.ArgumentParser(prog="python -m api_client.dashboard.command")
    add_arguments(parser)
    return cmd_dashboard(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
