"""Service tests reuse the engine's seeded model fixtures (the shared `mesh` fixture is in tests/conftest.py)."""
from tests.engine.conftest import model_root, tiny_model  # noqa: F401 - re-exported fixtures
