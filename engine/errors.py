"""Typed errors of the engine; services map each class to one gRPC status code."""


class InstGenIEError(Exception):
    """Base of every error the engine raises on purpose."""

    #: canonical gRPC status name the services answer with
    grpc_code = "INTERNAL"


class InvalidInputError(InstGenIEError, ValueError):
    """The caller's input cannot be served as given; the message says what to change."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidMaskError(InvalidInputError):
    """Mask of the wrong size, shape or value range."""


class EmptyMaskError(InvalidMaskError):
    """A mask that selects no pixel: there is nothing to edit."""


class InvalidStepsError(InvalidInputError):
    """Denoising steps out of the allowed range or different from the template's."""


class InvalidPromptError(InvalidInputError):
    """A prompt the model cannot encode (too long, or not a label the model knows)."""


class InvalidImageError(InvalidInputError):
    """An image of the wrong size or that cannot be decoded."""


class TemplateNotFoundError(InstGenIEError, KeyError):
    """No template cache with that id."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "template not found"


class CacheMismatchError(InstGenIEError):
    """The template cache was built for another model, resolution or cache mode."""

    grpc_code = "FAILED_PRECONDITION"


class CacheIntegrityError(InstGenIEError):
    """A cache shard failed its sha256 check or cannot be parsed."""

    grpc_code = "DATA_LOSS"


class CacheUnavailableError(InstGenIEError):
    """The store holding template caches cannot be reached right now; retrying later may work."""

    grpc_code = "UNAVAILABLE"


class ModelLoadError(InstGenIEError):
    """A model directory is missing, incomplete or of an unknown kind."""

    grpc_code = "FAILED_PRECONDITION"
