"""What the value-rounding benchmarks (value_feedback.py, value_noise_shaping.py) share:
SmolLM2 with an empirical-Fisher capture of the calibration text, the shipped key feedback
fitted on it, a ring codec whose keys round with that feedback, and scoring codecs in
lockstep with the fp16 cache (KL, Δppl) into JSON rows."""

import json
from pathlib import Path


def uniform(shape, bits: int):
    """The benchmarks' geometry: uniform widths, W1024 + 4 sinks, block/group 32, rotation on."""
    from edgekv.policy import CachePolicy

    return CachePolicy.uniform(shape.num_layers, bits, window=1024, sinks=4, block=32, group=32, rotation="hadamard")


def load():
    """(loaded, KVShape, empirical-Fisher Capture of the calibration text, its KeyFeedback)."""
    import torch

    from edgekv.calibration import calibration_ids, capture, key_feedback
    from edgekv.export.model_loading import load_model
    from edgekv.reference.model import kv_shape

    loaded = load_model("default")
    shape = kv_shape(loaded.model.config)
    with torch.no_grad():
        emp = capture(loaded.model, calibration_ids(loaded.tokenizer), fisher="empirical")
    return loaded, shape, emp, key_feedback(loaded.model, emp, uniform(shape, 3))


def feedback_keys_codec(keys):
    """A RingCodec base class whose keys round with `keys` (a KeyFeedback); values stay
    the subclass's job."""
    import torch

    from edgekv.methods.base import RingCodec
    from edgekv.reference import quant_torch as qt

    class FeedbackKeys(RingCodec):
        def keys(self, layer, x, bits):
            return qt.fake_quantize_keys(x, bits, feedback=torch.from_numpy(keys.layer(layer).copy()))

    return FeedbackKeys


def score(loaded, shape, codecs: dict, bits: list[int], max_tokens: int, sequences: int,
          label: str) -> tuple[list[dict], int]:
    """(rows {bits, label: codec name, kl, delta_pct} of every codec at every width, each
    width's codecs in lockstep with the fp16 cache over the evaluation text; its tokens)."""
    from edgekv.methods.codec_cache import method_model
    from edgekv.quality.divergence import divergences
    from edgekv.quality.text import evaluation_text

    ids = loaded.tokenizer(evaluation_text()).input_ids[:max_tokens]
    model, rows = loaded.model, []
    for b in bits:
        scores = divergences(method_model(model, uniform(shape, 16)),
                             [method_model(model, uniform(shape, b), c) for c in codecs.values()], ids, sequences=sequences)
        rows += [{"bits": b, label: name, "kl": r.kl, "delta_pct": r.delta_pct} for name, r in zip(codecs, scores)]
    return rows, len(ids)


def write(path: str, rows: list[dict], tokens: int, sequences: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"tokens": tokens, "sequences": sequences, "rows": rows}, indent=2))
