"""Service tests reuse the engine's seeded model fixtures."""
from tests.engine.conftest import model_root, tiny_model  # noqa: F401 - re-exported fixtures
