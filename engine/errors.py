"""Typed errors of the engine; each class has a stable `code` and one gRPC status (`grpc_code`).

Torch-free: the gateway imports this module to map errors without loading a model stack.
`code` is a stable machine-readable reason (google.rpc.ErrorInfo.reason); `field` names the request field at
fault (google.rpc.BadRequest.FieldViolation.field) where one is.
"""
from __future__ import annotations


class InstGenIEError(Exception):
    """Base of every error the engine raises on purpose."""

    #: canonical gRPC status name the services answer with
    grpc_code = "INTERNAL"
    #: stable reason code of this class; never reused for another meaning
    code = "INTERNAL"

    def __init__(self, *args, field: str | None = None):
        super().__init__(*args)
        self.field = field


class InvalidInputError(InstGenIEError, ValueError):
    """The caller's input cannot be served as given; the message says what to change."""

    grpc_code = "INVALID_ARGUMENT"
    code = "INVALID_ARGUMENT"


class InvalidMaskError(InvalidInputError):
    """Mask of the wrong size, shape, type or value range."""

    code = "INVALID_MASK"


class EmptyMaskError(InvalidMaskError):
    """A mask that selects no pixel: there is nothing to edit."""

    code = "EMPTY_MASK"


class InvalidStepsError(InvalidInputError):
    """Denoising steps not an integer, out of the allowed range, or different from the template's."""

    code = "INVALID_STEPS"


class InvalidPromptError(InvalidInputError):
    """A prompt the model cannot encode (not text, too long, or not a label the model knows)."""

    code = "INVALID_PROMPT"


class InvalidImageError(InvalidInputError):
    """An image of the wrong size, type, value range, or that cannot be decoded."""

    code = "INVALID_IMAGE"


class ImageTooLargeError(InvalidImageError):
    """An encoded image over the byte limit, or declaring more pixels than allowed (refused before decoding)."""

    code = "IMAGE_TOO_LARGE"


class InvalidSeedError(InvalidInputError):
    """A seed that is not an integer in [0, 2**64 - 1]."""

    code = "INVALID_SEED"


class InvalidGuidanceError(InvalidInputError):
    """A guidance scale that is not a finite number in the allowed range."""

    code = "INVALID_GUIDANCE"


class InvalidDilateError(InvalidInputError):
    """A mask dilation that is not an integer in the allowed range."""

    code = "INVALID_DILATE"


class InvalidTemplateIdError(InvalidInputError):
    """A template id outside the safe character set or length (it becomes part of a store key)."""

    code = "INVALID_TEMPLATE_ID"


class InvalidRequestIdError(InvalidInputError):
    """A request id outside the safe character set or length."""

    code = "INVALID_REQUEST_ID"


class RequestInFlightError(InvalidInputError):
    """A request with the same id is already in flight on this engine loop."""

    grpc_code = "ALREADY_EXISTS"
    code = "REQUEST_IN_FLIGHT"


class TemplateExistsError(InstGenIEError):
    """A different template is already registered under that id; delete it first or choose another id."""

    grpc_code = "ALREADY_EXISTS"
    code = "TEMPLATE_EXISTS"


class TemplateNotFoundError(InstGenIEError, KeyError):
    """No template cache with that id."""

    grpc_code = "NOT_FOUND"
    code = "TEMPLATE_NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "template not found"


class CacheMismatchError(InstGenIEError):
    """The template cache was built for another model (weights fingerprint), resolution or cache mode."""

    grpc_code = "FAILED_PRECONDITION"
    code = "CACHE_MISMATCH"


class CacheIntegrityError(InstGenIEError):
    """A cache shard or manifest failed its checksum, its schema, or cannot be parsed."""

    grpc_code = "DATA_LOSS"
    code = "CACHE_INTEGRITY"


class CacheUnavailableError(InstGenIEError):
    """The store holding template caches cannot be reached right now; retrying later may work."""

    grpc_code = "UNAVAILABLE"
    code = "CACHE_UNAVAILABLE"


class ModelLoadError(InstGenIEError):
    """A model directory is missing, incomplete or of an unknown kind."""

    grpc_code = "FAILED_PRECONDITION"
    code = "MODEL_LOAD"


class EngineStoppedError(InstGenIEError, RuntimeError):
    """The engine loop is stopped and takes no more work."""

    grpc_code = "UNAVAILABLE"
    code = "ENGINE_STOPPED"


def error_classes() -> list[type[InstGenIEError]]:
    """Every error class defined here (for code tables and the uniqueness test)."""
    out, todo = [], [InstGenIEError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in out if c.__module__ == __name__]
