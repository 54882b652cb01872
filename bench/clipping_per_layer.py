"""Would per-layer clip ratios beat one ratio per side and width? (edgekv.clipping)

Calibration predicts each layer's loss at every ratio; the shipped policy keeps, per side
and width, the ratio with the least *summed* prediction. This script takes each layer's
own best ratio instead (what a per-layer format would store) and runs both in lockstep
with the fp16 cache on evaluation text, uniform 2- and 3-bit. The reference cache has no
per-layer ratios, so the per-layer rows patch CompressedKVCache._push_block to look the
ratio up by layer: an experiment, not a format.

    .venv/bin/python bench/clipping_per_layer.py [--max-tokens 4096] [--sequences 4]
"""

import argparse
import dataclasses

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    args = ap.parse_args()

    from edgekv import calibration as cal
    from edgekv.export.model_loading import load_model
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.quality.text import evaluation_text
    from edgekv.reference import cache as ref_cache
    from edgekv.reference.model import ReferenceModel, kv_shape

    loaded = load_model("default")
    model, n = loaded.model, kv_shape(loaded.model.config).num_layers
    base = CachePolicy.uniform(n, 3, window=1024, sinks=4, block=32, group=32, rotation="hadamard", meta="u8")
    clips = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7)
    ids = cal.calibration_ids(loaded.tokenizer)
    with torch.no_grad():  # measure()'s own steps, keeping every layer's losses
        cap = cal.capture(model, ids)
        first = base.sinks + base.block
        queries = torch.linspace(first, len(ids) - 1, min(cal.DEFAULT_QUERIES, len(ids) - first)).round().long().unique()
        per = [cal.layer_sensitivity(cap, i, base, queries, clips=clips) for i in range(n)]
    own, shared = {}, []
    for j, side in enumerate("kv"):
        for w in (2, 3, 4):
            for i, losses in enumerate(per):
                own[i, side, w] = min(clips, key=lambda c: losses[j][w, c])
            best = min(clips, key=lambda c: sum(losses[j][w, c] for losses in per))
            shared.append((side, w, best))
            print(f"{side}{w}: shared {best:g}, predicted {sum(p[j][w, best] for p in per):.5f}; per layer "
                  f"predicted {sum(p[j][w, own[i, side, w]] for i, p in enumerate(per)):.5f}")

    class PerLayer(CachePolicy):  # marks the policies whose ratio is looked up by layer
        pass

    push = ref_cache.CompressedKVCache._push_block

    def push_per_layer(self, layer):
        if isinstance(self.policy, PerLayer):
            object.__setattr__(self.policy, "clip_ratio", lambda side, bits: own.get((layer, side, bits), 1.0))
        return push(self, layer)

    ref_cache.CompressedKVCache._push_block = push_per_layer
    names, tests = [], []
    for w in (2, 3):
        p = base.with_(bits_k=(w,) * n, bits_v=(w,) * n, clip=tuple(shared))
        tests += [ReferenceModel(model, p), ReferenceModel(model, PerLayer(**{
            f.name: getattr(p, f.name) for f in dataclasses.fields(p)}))]
        names += [f"{w}-bit, one ratio per side and width", f"{w}-bit, per-layer ratios"]
    fp16 = ReferenceModel(model, base.with_(bits_k=(16,) * n, bits_v=(16,) * n))
    eval_ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    for name, d in zip(names, divergences(fp16, tests, eval_ids, sequences=args.sequences)):
        print(f"{name}: KL {d.kl:.5f}, Δppl {d.delta_pct:+.2f} %")


if __name__ == "__main__":
    main()
