import pytest


@pytest.fixture(autouse=True)
def _identity(message_identity):
    """Every server test may build Messages by hand."""
    yield
