import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from edgekv.export.tiny import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (converted once per machine, then ~1 s to load)."""
    from edgekv.export.model_loading import load_model

    return load_model("default")
