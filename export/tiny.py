"""Tiny random Llama-architecture models for tests: built in a second, no download."""

from __future__ import annotations


def tiny_llama(num_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 16, vocab: int = 256, intermediate: int = 128,
               rope_theta: float = 10000.0, seed: int = 0, model_type: str = "llama"):
    """A randomly initialised causal LM with the Llama shape (GQA when kv_heads < heads)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, rope_theta=rope_theta,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default weights make attention peaky, so cache errors show in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()
