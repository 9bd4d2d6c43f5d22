"""What the scheduler checks and keys of an incoming request: the cost model's token counts, and the fingerprint
that tells a retry of an edit (same request id, same inputs) from a different edit reusing its id."""
from __future__ import annotations

import hashlib

from instgenie.scheduler.v1 import scheduler_service_pb2 as pb

from ..common.status import invalid


def check_tokens(masked: int, image: int) -> None:
    """The cost model's token counts: none negative, no more masked tokens than the template has."""
    if masked < 0:
        raise invalid("masked_tokens", f"masked_tokens must be >= 0, got {masked}")
    if image < 0:
        raise invalid("image_tokens", f"image_tokens must be the template's token count, or 0 for the model's "
                      f"default size; got {image}")
    if image and masked > image:
        raise invalid("masked_tokens", f"masked_tokens ({masked}) exceeds the template's image_tokens ({image})")


def fingerprint(request: pb.EditRequest) -> bytes:
    """What makes two edits the same edit: every input, but not how often the caller wants progress or
    previews (a retry may come from a unary Edit or a StreamEdit and still be the same edit)."""
    same = pb.EditRequest()
    same.CopyFrom(request)
    same.edit.progress_interval_ms = 0
    same.edit.preview_every_steps = 0
    same.tenant_max_in_flight = 0
    return hashlib.sha256(same.SerializeToString(deterministic=True)).digest()
