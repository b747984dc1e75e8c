"""``pnv fleet init`` / ``pnv fleet serve``: the fleet store's tables, and a local PostgreSQL for one machine."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from pnv_ros.cli.common import Number, say


def register(sub: Any) -> None:
    """Add ``fleet`` (``init``, ``serve``) to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser("fleet", help="a fleet's shared place map in PostgreSQL + pgvector (init, serve)")
    fleet = sp.add_subparsers(dest="fleet_cmd", required=True, metavar="ACTION")
    init = fleet.add_parser("init", help="create the fleet store's tables in a database (once)")
    init.add_argument("dsn", metavar="DSN", help="libpq connection string or postgresql:// URI of the database")
    init.add_argument(
        "--dim",
        type=Number(int, 1, 2000),
        default=512,
        help="global descriptor dimension (the model's WPCA size; default 512, the default model's; HNSW "
        "indexes at most 2000)",
    )
    init.set_defaults(func=cmd_init)
    serve = fleet.add_parser(
        "serve",
        help="run a local PostgreSQL with pgvector (Unix socket only) in a data folder, print its DSN, "
        "stop it on Ctrl-C / SIGTERM",
    )
    serve.add_argument("--data", required=True, metavar="DIR", help="data folder (made when missing; reused)")
    serve.add_argument(
        "--user",
        default=None,
        help="the unprivileged user the server runs as when started by root (default: nobody)",
    )
    serve.add_argument(
        "--dim", type=Number(int, 1, 2000), default=512, help="descriptor dimension of the store it creates"
    )
    serve.add_argument(
        "--port",
        type=Number(int, 1024, 65535),
        default=None,
        help="also listen on 127.0.0.1:PORT (loopback only; password authentication, the password in "
        "DIR/pgpass, which the printed DSN names); default: the Unix socket only",
    )
    serve.add_argument("--no-init", action="store_true", help="do not create the fleet store's tables")
    serve.set_defaults(func=cmd_serve)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the tables; say whether they were made or were there."""
    from pnv_ros.fleet.schema import SCHEMA_VERSION
    from pnv_ros.fleet.store import init_store, redact

    made = init_store(args.dsn, args.dim)
    state = "created" if made else "already holds"
    print(f"{redact(args.dsn)}: {state} a fleet store (schema version {SCHEMA_VERSION}, {args.dim}-d)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the server, print the DSN (stdout, one line), wait for a signal or the server's exit, stop it."""
    from pnv_ros.fleet.server import LocalServer
    from pnv_ros.fleet.store import init_store

    tcp = args.port is not None
    server = LocalServer(args.data, run_as=args.user, port=args.port if tcp else 5432, tcp=tcp)
    stop = []

    def on_term(signum: int, frame: object) -> None:
        stop.append(signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        dsn = server.start()
        if not args.no_init:
            init_store(dsn, args.dim)
        print(dsn, flush=True)
        say(f"PostgreSQL (as {server.user}) in {server.data_dir}, log {server.log_path}; Ctrl-C stops it")
        status = None
        while not stop and status is None:
            try:
                status = server.wait(0.5)
            except KeyboardInterrupt:
                stop.append(signal.SIGINT)
        if status is not None:
            print(f"error: the server exited ({status}); see {server.log_path}", file=sys.stderr)
            return 1
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, old)
