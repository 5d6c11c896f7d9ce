"""Store fixtures live in tests/conftest.py; re-exported here for imports that name this module."""
from tests.conftest import make_planted_store  # noqa: F401
