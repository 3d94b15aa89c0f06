"""The project's own commands besides the two scripts:

    python -m mnist_optuna proxy STORAGE [--host HOST] [--port PORT]   # Optuna's gRPC storage proxy
    python -m mnist_optuna workers N [--restarts R] -- COMMAND         # N workers of a script on this machine
"""
import argparse
import errno
import socket
import sys
from pathlib import Path

import optuna

from errors import UserError, first_line
from mnist_optuna import launch
from mnist_optuna.cli import Parser, run
from mnist_optuna.storages import GRPC_PORT, make_storage, storage_kind

USAGE = ("usage: python -m mnist_optuna proxy STORAGE [--host HOST] [--port PORT]\n"
         "       python -m mnist_optuna workers N [--restarts R] -- python MNIST-optuna.py --storage PATH_OR_URL ...")


def serve_proxy(argv=None):
    """`python -m mnist_optuna proxy STORAGE [--host HOST] [--port PORT]`: Optuna's gRPC storage proxy in front of a
    database URL (or a journal file), so that many workers (--storage grpc://HOST:PORT) share one connection
    to the database instead of one each."""
    parser = Parser(serve_proxy.__doc__)
    parser.prog = "python -m mnist_optuna proxy"
    parser.add_argument("storage", help="the database URL (postgresql://..., mysql://..., sqlite:///...) or journal")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    parser.add_argument("--port", type=port_number, default=GRPC_PORT, help=f"port to listen on (default {GRPC_PORT})")
    args = parser.parse_args(argv)
    kind = storage_kind(args.storage)
    if kind == "grpc":
        raise UserError("the proxy stands in front of a database or a journal, not of another proxy")
    check_port_free(args.host, args.port)
    storage = make_storage(args.storage, Path(args.storage).parent if kind == "journal" else ".")
    print(f"storage proxy for {args.storage} on {args.host}:{args.port}; workers pass "
          f"--storage grpc://<this host>:{args.port}", flush=True)
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=args.host, port=args.port)
    except RuntimeError as error:  # gRPC's "Failed to bind": taken between the check and the start
        raise UserError(f"the proxy cannot listen on {args.host}:{args.port} ({first_line(error)}); pass another "
                        "--port or --host") from None


def port_number(text):
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def check_port_free(host, port):
    """Refuse a port something already listens on. gRPC sets SO_REUSEPORT, so a second proxy on the port of a first
    would start without a word and the workers would split between two storages; a plain socket bound here, without
    that option, finds the port taken."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(f"--host {host}: {error.strerror}; pass an address of this machine (0.0.0.0: every "
                        "interface)") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise UserError(f"port {port} on {host} is in use (another proxy or service listens on it); "
                                    "pass another --port, or give the workers that one's grpc:// address") from None
                raise UserError(f"the proxy cannot listen on {host}:{port} ({error.strerror}); pass another --port "
                                "or --host") from None


COMMANDS = {"proxy": serve_proxy, "workers": launch.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(USAGE)
    run(lambda argv: COMMANDS[sys.argv[1]](sys.argv[2:]))
