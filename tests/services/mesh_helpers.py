"""Helpers for end-to-end tests against a running local mesh: stubs, credentials, images, template creation."""
from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc
from instgenie.services.local.mesh import LocalMesh, MeshConfig

TENANTS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789"}
#: tokens per side of the digits model's 16x16 canvas
SIZE = 16


def start_mesh(state_dir: Path, workers: int = 2, **overrides) -> LocalMesh:
    # Batches of 4 so that a dozen edits over two workers already queue (keepalives, queue positions).
    overrides.setdefault("max_batch_size", 4)
    config = MeshConfig(state_dir=state_dir, workers=workers, tenants=dict(TENANTS),
                        gateway_args=["--keepalive-seconds", "0.3"], **overrides)
    return LocalMesh(config).start()


def auth(tenant: str = "alpha") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TENANTS[tenant]}"),)


def channel(mesh) -> grpc.Channel:
    return grpc.insecure_channel(mesh.gateway.address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                ("grpc.max_send_message_length", 64 << 20)])


def stub(ch) -> pb_grpc.EditServiceStub:
    return pb_grpc.EditServiceStub(ch)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def digit(label: int = 3, index: int = 0) -> np.ndarray:
    """A real handwritten digit from the test split, as a 16x16 uint8 image."""
    from instgenie.engine.latents import tensor_to_image
    from instgenie.engine.models.digits import load_digits_dataset

    images, labels = load_digits_dataset("test")
    i = int(np.flatnonzero(labels.numpy() == label)[index])
    return np.asarray(tensor_to_image(images[i]))


def half_mask(side: str = "right") -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    if side == "right":
        mask[:, SIZE // 2:] = 255
    else:
        mask[:, : SIZE // 2] = 255
    return mask


def create_template(s, tenant: str = "alpha", image: np.ndarray | None = None, prompt: str = "3", steps: int = 0,
                    seed: int = 0, timeout: float = 120) -> str:
    image = digit() if image is None else image
    op = s.CreateTemplate(pb.CreateTemplateRequest(image=png(image), prompt=prompt, steps=steps, seed=seed,
                                                   name="test"), metadata=auth(tenant), timeout=30).operation
    op = s.WaitOperation(pb.WaitOperationRequest(name=op.name), metadata=auth(tenant), timeout=timeout).operation
    assert op.done and not op.HasField("error"), op
    meta = pb.CreateTemplateMetadata()
    op.metadata.Unpack(meta)
    return meta.template_id


def decode(png_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_bytes)))


def health(address: str, timeout: float = 5.0) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def port_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        try:
            sock.connect((host, int(port)))
        except OSError:
            return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
