"""Engine on tiny bundles: token-for-token equal to ReferenceModel, sampling, chat, stats."""

import numpy as np
import pytest
import torch

from edgekv.policy import CachePolicy
from edgekv.reference.model import ReferenceModel
from edgekv.runtime import Engine, EngineError
from edgekv.runtime.sampler import Sampler, SamplingError
from edgekv.runtime.tokenizer import TokenizerError

try:
    from runtime_helpers import CHAT_TEMPLATE, make_bundle
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import CHAT_TEMPLATE, make_bundle

GEOMETRY = dict(window=64, sinks=4, block=8, group=8)


def _policy(bits_k, bits_v, positions="cache", rotation="none"):
    return CachePolicy(bits_k=bits_k, bits_v=bits_v, positions=positions, rotation=rotation, **GEOMETRY)


@pytest.fixture(scope="module")
def chat_model():
    """Vocabulary = the 95 printable characters of the test tokenizer, so generated text
    re-encodes to the same ids (what chat-turn reuse relies on)."""
    from edgekv.export.tiny import tiny_llama

    return tiny_llama(vocab=95, seed=3)


@pytest.fixture(scope="module")
def bundle3(chat_model, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "b3"
    return make_bundle(chat_model, tiny_model_dir, out, _policy((3, 3), (3, 3)), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def engine(bundle3):
    return Engine.load(bundle3)


@pytest.mark.parametrize("bits_k,bits_v,positions,rotation", [
    ((2, 2), (2, 2), "cache", "none"), ((3, 3), (3, 3), "cache", "none"), ((4, 4), (4, 4), "cache", "none"),
    ((4, 8), (2, 16), "cache", "none"), ((16, 16), (16, 16), "cache", "none"),
    ((3, 3), (3, 3), "original", "none"), ((4, 8), (2, 16), "original", "none"),
    ((3, 2), (3, 4), "cache", "hadamard"), ((4, 8), (2, 16), "original", "hadamard"),
    ((1, 5), (6, 1), "cache", "hadamard"),
])
def test_greedy_identical_to_reference(tiny_model, tiny_model_dir, tmp_path, bits_k, bits_v, positions, rotation):
    """150-token prompt + 100 tokens through a 64-token window: eviction on every path
    (full prefill chunks, padded prefill before boundaries, decode); rotated blocks too."""
    _check_greedy(tiny_model, tiny_model_dir, tmp_path, _policy(bits_k, bits_v, positions, rotation))


def test_clipped_bundle_greedy_identical_to_reference(tiny_model, tiny_model_dir, tmp_path):
    """Calibrated clip ratios (edgekv.clipping) reach pack.onnx through the bundle."""
    clip = (("k", 2, 0.9), ("k", 3, 0.95), ("v", 3, 0.85), ("v", 4, 0.8))
    _check_greedy(tiny_model, tiny_model_dir, tmp_path, _policy((3, 2), (3, 4), rotation="hadamard").with_(clip=clip))


def test_key_feedback_bundle_greedy_identical_to_reference(tiny_model, tiny_model_dir, tmp_path):
    """Key feedback matrices (edgekv.key_feedback) travel in key_feedback.npy and are fed
    to pack.onnx per layer; the reference rounds with the same matrices."""
    from edgekv.calibration import capture, key_feedback

    policy = _policy((3, 2), (3, 4), rotation="hadamard").with_(clip=(("k", 2, 0.9),))
    fb = key_feedback(tiny_model, capture(tiny_model, list(range(64)), fisher="empirical"), policy)
    assert np.abs(fb.matrices).max() > 0.01  # the tiny model's queries do couple channels
    _check_greedy(tiny_model, tiny_model_dir, tmp_path, policy.with_(key_feedback=fb))


@pytest.mark.parametrize("bits_k,bits_v,residual,meta", [((3, 2), (3, 4), "u8", "u8"), ((4, 16), (16, 2), "u8", "u8"),
                                                          ((3, 2), (3, 4), "u8h", "u8s"),
                                                          ((4, 16), (16, 2), "u8hr", "u8s")])
def test_u8_residual_bundle_greedy_identical_to_reference(tiny_model, tiny_model_dir, tmp_path, bits_k, bits_v,
                                                          residual, meta):
    """residual u8/u8h/u8hr: the runtime stores the graphs' 8-bit new K/V in the sinks/residual
    and packs from them (16-bit ring sides get them dequantized), as the reference does;
    the cache it allocates is the policy's smaller byte count."""
    policy = _policy(bits_k, bits_v, rotation="hadamard").with_(meta=meta, residual=residual)
    _check_greedy(tiny_model, tiny_model_dir, tmp_path, policy)
    eng = Engine.load(tmp_path / "b")
    shape = eng.bundle.shape
    assert eng.state.nbytes == policy.total_bytes(shape) < policy.with_(residual="fp16").total_bytes(shape)


def _check_greedy(tiny_model, tiny_model_dir, tmp_path, policy):
    eng = Engine.load(make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy))
    assert eng.bundle.policy == policy  # through the manifest
    calls = []
    run = eng.backend.run
    eng.backend.run = lambda ids, t: calls.append((len(ids), t)) or run(ids, t)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    got = list(eng.generate_tokens(ids[0].tolist(), 100, ignore_eos=True))
    ref = ReferenceModel(tiny_model, policy)
    cache = ref.new_cache()
    expect = list(ref.generate(ids, 100, cache))
    assert got == expect
    assert cache.blocks_pushed > cache.ring_slots  # eviction happened
    assert eng.state.blocks_pushed == cache.blocks_pushed
    assert (8, 8) in calls and (1, 1) in calls  # full prefill chunks and decode steps
    assert any(n < t for n, t in calls)  # a padded prefill before the first block boundary


def test_chunked_prompt_after_unaligned_start(engine, chat_model):
    """A second segment starting mid-block (padded prefill, then full chunks) matches a
    reference fed the same tokens."""
    engine.reset()
    ref = ReferenceModel(chat_model, _policy((3, 3), (3, 3)))
    cache = ref.new_cache()
    a, b = list(range(20, 33)), list(range(0, 90))
    list(engine.generate_tokens(a, 0))
    ref.forward(torch.tensor([a]), cache)
    got = list(engine.generate_tokens(b, 30, ignore_eos=True))
    logits = ref.forward(torch.tensor([b]), cache)[:, -1]
    expect = [int(logits.argmax())]
    for _ in range(29):
        expect.append(int(ref.forward(torch.tensor([[expect[-1]]]), cache)[:, -1].argmax()))
    assert got == expect


def test_text_stream_matches_tokens_and_stats(engine):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # 180 tokens > window
    text = "".join(engine.generate(prompt, max_new_tokens=40, ignore_eos=True))
    s = engine.last_stats
    assert s.prompt_tokens == len(prompt) and s.new_tokens == 40 and s.stop_reason == "length"
    engine.reset()
    ids = list(engine.generate_tokens(engine.tokenizer.encode(prompt), 40, ignore_eos=True))
    assert text == engine.tokenizer.decode(ids)
    assert s.ttft_s > 0 and s.tokens_per_s > 0 and s.peak_rss_bytes >= s.rss_bytes > 0
    assert s.kv_bytes == engine.bundle.cache_bytes == engine.state.nbytes
    assert "tok/s" in s.summary()


def test_buffers_are_never_reallocated(engine):
    before = {n: b.ctypes.data for n, b in engine.state.buffers.items()}
    logits_ptr = engine.backend.logits.ctypes.data
    list(engine.generate("x" * 300, max_new_tokens=50, ignore_eos=True))
    assert {n: b.ctypes.data for n, b in engine.state.buffers.items()} == before
    assert engine.backend.logits.ctypes.data == logits_ptr


def test_seeded_sampling_is_deterministic(engine):
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    a = "".join(engine.generate("Hello", seed=1, **kw))
    b = "".join(engine.generate("Hello", seed=1, **kw))
    c = "".join(engine.generate("Hello", seed=2, **kw))
    greedy = "".join(engine.generate("Hello", max_new_tokens=30, ignore_eos=True))
    assert a == b and a != c and a != greedy


def test_sampler_rules():
    logits = np.array([0.0, 5.0, 4.9, -1.0], np.float32)
    assert Sampler()(logits) == 1
    assert Sampler(temperature=1.0, top_k=1, seed=0)(logits) == 1
    assert {Sampler(temperature=1.0, top_p=1e-6, seed=s)(logits) for s in range(20)} == {1}
    draws = {Sampler(temperature=1.0, top_k=2, seed=s)(logits) for s in range(50)}
    assert draws == {1, 2}
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2)):
        with pytest.raises(SamplingError):
            Sampler(**bad)


def test_stop_strings(engine):
    full = "".join(engine.generate("abc", max_new_tokens=30, ignore_eos=True))
    stop = full[10:13]
    cut = "".join(engine.generate("abc", max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert cut == full[:full.index(stop)] and engine.last_stats.stop_reason == "stop"


def test_multi_turn_chat_prefills_only_the_new_turn(engine, bundle3):
    engine.reset()
    chat = [{"role": "user", "content": "Hi there! Tell me about caches." * 3}]
    reply = "".join(engine.generate(chat, max_new_tokens=20, ignore_eos=True))
    first = engine.last_stats
    assert first.reused_tokens == 0 and first.prefill_tokens == first.prompt_tokens
    chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    second_text = "".join(engine.generate(chat, max_new_tokens=20, ignore_eos=True))
    s = engine.last_stats
    # Everything fed in turn 1 (prompt + all but the last reply token) is reused.
    assert s.reused_tokens == first.prompt_tokens + first.new_tokens - 1
    assert s.prefill_tokens == s.prompt_tokens - s.reused_tokens < 30
    # Same greedy text as a fresh engine that prefills the whole conversation.
    fresh = Engine.load(bundle3)
    assert "".join(fresh.generate(chat, max_new_tokens=20, ignore_eos=True)) == second_text
    engine.reset()
    list(engine.generate(chat, max_new_tokens=2))
    assert engine.last_stats.reused_tokens == 0


def test_regenerating_a_turn_rewinds_the_residual(engine):
    """The same conversation again: its last prompt token sits in the fp16 residual, so
    the cache rewinds one token instead of prefilling everything."""
    engine.reset()
    chat = [{"role": "user", "content": "abcdefgh" * 9}]  # 90 tokens with the template
    first = "".join(engine.generate(chat, max_new_tokens=2, ignore_eos=True))
    n = engine.last_stats.prompt_tokens
    assert engine.state.n_res > 0
    again = "".join(engine.generate(chat, max_new_tokens=2, ignore_eos=True))
    s = engine.last_stats
    assert (s.reused_tokens, s.prefill_tokens) == (n - 1, 1) and again == first


def test_bad_requests(engine, tiny_model, tiny_model_dir, tmp_path):
    with pytest.raises(EngineError, match="empty prompt"):
        engine.generate("")
    with pytest.raises(EngineError, match="string or a list"):
        engine.generate(42)
    with pytest.raises(EngineError, match="backend"):
        Engine.load(tmp_path, backend="nope")  # unknown name (tvm is a backend now)
    plain = Engine.load(make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", _policy((3, 3), (3, 3))))
    with pytest.raises(TokenizerError, match="no chat template"):
        plain.generate([{"role": "user", "content": "hi"}])


def test_close_early_keeps_engine_usable(engine):
    g = engine.generate("hello", max_new_tokens=50, ignore_eos=True)
    next(g)
    g.close()
    assert g.stats.stop_reason == "closed"
    assert len("".join(engine.generate("hello", max_new_tokens=5, ignore_eos=True))) > 0
