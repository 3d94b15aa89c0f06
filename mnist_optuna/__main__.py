"""The project's own commands besides the two scripts:

    python -m mnist_optuna proxy STORAGE [--host HOST] [--port PORT]   # Optuna's gRPC storage proxy
"""
import argparse
import sys
from pathlib import Path

import optuna

from errors import UserError
from mnist_optuna.cli import run
from mnist_optuna.storages import GRPC_PORT, make_storage, storage_kind

USAGE = "usage: python -m mnist_optuna proxy STORAGE [--host HOST] [--port PORT]"


def serve_proxy(argv=None):
    """`python -m mnist_optuna proxy STORAGE [--host HOST] [--port PORT]`: Optuna's gRPC storage proxy in front of a
    database URL (or a journal file), so that many workers (--storage grpc://HOST:PORT) share one connection
    to the database instead of one each."""
    parser = argparse.ArgumentParser(prog="python -m mnist_optuna proxy", description=serve_proxy.__doc__)
    parser.add_argument("storage", help="the database URL (postgresql://..., mysql://..., sqlite:///...) or journal")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    parser.add_argument("--port", type=int, default=GRPC_PORT, help=f"port to listen on (default {GRPC_PORT})")
    args = parser.parse_args(argv)
    kind = storage_kind(args.storage)
    if kind == "grpc":
        raise UserError("the proxy stands in front of a database or a journal, not of another proxy")
    storage = make_storage(args.storage, Path(args.storage).parent if kind == "journal" else ".")
    print(f"storage proxy for {args.storage} on {args.host}:{args.port}; workers pass "
          f"--storage grpc://<this host>:{args.port}", flush=True)
    optuna.storages.run_grpc_proxy_server(storage, host=args.host, port=args.port)


if __name__ == "__main__":
    if sys.argv[1:2] != ["proxy"]:
        sys.exit(USAGE)
    run(lambda argv: serve_proxy(sys.argv[2:]))
