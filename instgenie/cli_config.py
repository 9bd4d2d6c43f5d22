"""Where the `instgenie` CLI connects: flags, then environment, then the local-mesh file `instgenie up` writes."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_SCHEDULER = "127.0.0.1:50052"


class ConfigError(Exception):
    """The local-mesh file exists but cannot be used."""


@dataclass(frozen=True)
class Endpoint:
    address: str
    api_key: str | None
    source: str  # where the address came from, so a connection error can say which setting to fix


def instgenie_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("INSTGENIE_HOME") or Path.home() / ".instgenie")


def local_mesh_file(env: Mapping[str, str]) -> Path:
    return instgenie_home(env) / "local.json"


def read_local_mesh(env: Mapping[str, str]) -> tuple[dict, Path] | None:
    """The local-mesh file's settings and path, or None when there is none."""
    path = local_mesh_file(env)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data, path


def _text(data: dict, key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f'{path}: "{key}" must be a string')
    return value


def gateway_endpoint(address: str | None, api_key: str | None, env: Mapping[str, str] = os.environ) -> Endpoint:
    """--address/--api-key, else INSTGENIE_ADDRESS/INSTGENIE_API_KEY; when neither is set anywhere, the
    local-mesh file's gateway and key (both from one place, so a key never goes to a gateway it was not made
    for); else the default address with no key."""
    source = "--address"
    if not address and env.get("INSTGENIE_ADDRESS"):
        address, source = env["INSTGENIE_ADDRESS"], "INSTGENIE_ADDRESS"
    api_key = api_key or env.get("INSTGENIE_API_KEY") or None
    if address:
        return Endpoint(address, api_key, source)
    if api_key is None:
        mesh = read_local_mesh(env)
        if mesh is not None:
            data, path = mesh
            return Endpoint(_text(data, "gateway", path) or DEFAULT_GATEWAY, _text(data, "api_key", path), str(path))
    return Endpoint(DEFAULT_GATEWAY, api_key, "the default address")


def scheduler_endpoint(scheduler: str | None, env: Mapping[str, str] = os.environ) -> Endpoint:
    """--scheduler, else INSTGENIE_SCHEDULER, else the local-mesh file's "scheduler", else the default."""
    if scheduler:
        return Endpoint(scheduler, None, "--scheduler")
    if env.get("INSTGENIE_SCHEDULER"):
        return Endpoint(env["INSTGENIE_SCHEDULER"], None, "INSTGENIE_SCHEDULER")
    mesh = read_local_mesh(env)
    if mesh is not None:
        data, path = mesh
        address = _text(data, "scheduler", path)
        if address:
            return Endpoint(address, None, str(path))
    return Endpoint(DEFAULT_SCHEDULER, None, "the default address")
