"""Command-line flags that fall back to INSTGENIE_* environment variables, shared by every service."""
from __future__ import annotations

import argparse
import os

from .server import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig


def env_name(flag: str) -> str:
    return "INSTGENIE_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse.ArgumentParser, flag: str, *, default=None, type=str, help: str = "", **kwargs):
    """A flag whose default comes from INSTGENIE_<FLAG> when set; the help text names the variable."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None:
        if kwargs.get("action") == "store_true":
            default = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            default = type(raw)
    suffix = f" [env {env}]" + (f" (default: {default})" if default not in (None, "", False) else "")
    if kwargs.get("action") == "store_true":
        return parser.add_argument(flag, default=default, help=help + suffix, **kwargs)
    return parser.add_argument(flag, default=default, type=type, help=help + suffix, **kwargs)


def add_server_flags(parser: argparse.ArgumentParser, listen: str) -> None:
    add_flag(parser, "--listen", default=listen, help="host:port to serve on (port 0: any free port)")
    add_flag(parser, "--max-message-bytes", default=DEFAULT_MAX_MESSAGE_BYTES, type=int,
             help="gRPC message size limit in bytes")
    add_flag(parser, "--reflection", action="store_true", help="serve gRPC reflection (for grpcurl and friends)")
    add_flag(parser, "--grace-seconds", default=10.0, type=float, help="time in-flight calls get at shutdown")
    add_flag(parser, "--ready-file", help="keep {address, pid, serving} here from the moment the port is bound")
    add_flag(parser, "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    # telemetry (services/common/telemetry.py)
    add_flag(parser, "--metrics-listen", default="",
             help="host:port of the Prometheus /metrics endpoint (port 0: any free port; empty: no metrics)")
    add_flag(parser, "--otlp-endpoint", default="",
             help="OTLP/gRPC collector (host:port or http://host:port) to send traces to; empty: no tracing")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(listen=args.listen, max_message_bytes=args.max_message_bytes, reflection=args.reflection,
                        grace_seconds=args.grace_seconds, ready_file=args.ready_file)


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """The S3 (MinIO) object store holding template caches and metadata; empty endpoint = a local directory."""
    add_flag(parser, "--s3-endpoint", default="", help="host:port of the S3/MinIO server")
    add_flag(parser, "--s3-bucket", default="instgenie", help="bucket for template caches and metadata")
    add_flag(parser, "--s3-access-key", default="", help="S3 access key (or AWS_ACCESS_KEY_ID)")
    add_flag(parser, "--s3-secret-key", default="", help="S3 secret key (or AWS_SECRET_ACCESS_KEY)")
    add_flag(parser, "--s3-secure", action="store_true", help="use https")
    add_flag(parser, "--store-dir", default="", help="use this local directory instead of S3 (single machine only)")


def open_store(args: argparse.Namespace):
    """The ObjectStore the flags describe."""
    from .objectstore import LocalObjectStore, S3ObjectStore

    if args.s3_endpoint:
        access = args.s3_access_key or os.environ.get("AWS_ACCESS_KEY_ID", "")
        secret = args.s3_secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        return S3ObjectStore(args.s3_endpoint, access, secret, args.s3_bucket, secure=args.s3_secure)
    if args.store_dir:
        return LocalObjectStore(args.store_dir)
    raise SystemExit("no object store: give --s3-endpoint (MinIO/S3) or --store-dir")
