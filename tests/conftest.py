import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from edgekv.export.tiny import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    """The tiny model saved as a Hugging Face directory with a character-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    tok = Tokenizer(models.WordLevel(vocab=vocab | {"[UNK]": 95}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (converted once per machine, then ~1 s to load)."""
    from edgekv.export.model_loading import load_model

    return load_model("default")
