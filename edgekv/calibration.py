"""Calibration: how much each layer's keys and values lose at each code width.

One forward and a few backward passes of the unquantized model over calibration text (the
reserved last quarter of edgekv.quality.text, never the evaluation part) record, per layer,
the pre-RoPE q/k/v (k, v rounded to fp16 as the cache stores them) and the diagonal Fisher
of the attention output (the input of o_proj): the mean of g^2, g = dLoss_y/d(output), over
next tokens y drawn from the model itself, so the estimate is the curvature of the KL
between the fp16 model and a perturbed one (the text's own labels, the "empirical" Fisher,
stay available for comparison). Then, per layer, side and width, only that side of that
layer is quantized with the cache's own quantizer (fake-quant: the codes the cache would
store, dequantized), the attention output is recomputed for a sample of queries under the
cache's visibility (fp16 sinks, quantized ring blocks within the window, the query's own
block fp16 as the residual), and the loss increase is predicted with the diagonal Fisher
estimate 1/2 * sum(E[g^2] * delta_o^2). Cheap (a forward, a few backwards, attention-only
recomputation) and in loss units, so layers are comparable and the knapsack in edgekv.allocation can add
them up. Needs torch; export and eval import it lazily.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from edgekv import clipping
from edgekv.allocation import WIDTHS, Sensitivity, policy_loss
from edgekv.policy import CachePolicy
from edgekv.reference import quant_torch as qt
from edgekv.reference.model import _rotate_half, check_supported, kv_shape

# 512 tokens keep export within its time budget on 2 CPU cores (one forward + backward).
DEFAULT_TOKENS = 512
DEFAULT_QUERIES = 128
FISHER_KINDS = ("empirical", "sampled")
# The true Fisher ranks layouts by the KL they cause; the empirical one (the text's own
# labels) left the allocation no better than uniform under rotation (BENCHMARKS.md).
DEFAULT_FISHER = "sampled"


@dataclass
class Capture:
    q: list[torch.Tensor]  # per layer [Hq, T, D] pre-RoPE
    k: list[torch.Tensor]  # [Hkv, T, D] pre-RoPE, fp16-rounded
    v: list[torch.Tensor]  # [Hkv, T, D] fp16-rounded
    grad: list[torch.Tensor]  # [T, Hq*D] dLoss(sum over tokens)/d(attention output)
    grad_sq: list[torch.Tensor]  # [T, Hq*D] the diagonal Fisher the sensitivities weight by
    cos: torch.Tensor  # [T, D]
    sin: torch.Tensor
    nll: float  # mean NLL of the unquantized model on the text


def capture(model, ids: list[int], fisher: str = DEFAULT_FISHER, samples: int = 4, seed: int = 0) -> Capture:
    """Forward + backward over `ids` with hooks; weights get no gradients. `fisher`:
    "empirical" squares the gradient of the loss on the text's own next tokens;
    "sampled" averages the squared gradients of `samples` losses on next tokens drawn from
    the model's own distribution: the true Fisher, the curvature of KL(model || perturbed),
    which is what layout selection and the benchmarks rank by."""
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    check_supported(model.config)
    shape = kv_shape(model.config)
    hq, hkv, d = model.config.num_attention_heads, shape.num_kv_heads, shape.head_dim
    layers = model.model.layers
    store: dict[str, list] = {"q": [None] * len(layers), "k": [None] * len(layers),
                              "v": [None] * len(layers), "o": [None] * len(layers)}
    hooks = []

    def keep(name, i, heads):
        def hook(_mod, _inp, out):
            store[name][i] = out.detach()[0].view(-1, heads, d).transpose(0, 1).float()
        return hook

    def keep_o(i):
        def hook(_mod, args):
            args[0].retain_grad()
            store["o"][i] = args[0]
        return hook

    for i, layer in enumerate(layers):
        a = layer.self_attn
        hooks += [a.q_proj.register_forward_hook(keep("q", i, hq)),
                  a.k_proj.register_forward_hook(keep("k", i, hkv)),
                  a.v_proj.register_forward_hook(keep("v", i, hkv)),
                  a.o_proj.register_forward_pre_hook(keep_o(i))]
    # Gradients flow from the embeddings on, never into the weights (half the backward).
    hooks.append(model.model.embed_tokens.register_forward_hook(
        lambda _m, _i, out: out.detach().requires_grad_(True)))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.tensor([ids])
        with torch.enable_grad():
            logits = model(input_ids=x).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            loss.backward(retain_graph=fisher == "sampled")
            grad = [o.grad[0].detach().float() for o in store["o"]]
            grad_sq = [g ** 2 for g in grad]
            if fisher == "sampled":
                grad_sq = _sampled_fisher(logits, store["o"], samples, seed)
        positions = torch.arange(len(ids))
        cos, sin = model.model.rotary_emb(store["k"][0][None], positions[None])
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    fp16 = lambda t: t.to(torch.float16).float()  # noqa: E731  what the cache stores
    return Capture(q=store["q"], k=[fp16(t) for t in store["k"]], v=[fp16(t) for t in store["v"]],
                   grad=grad, grad_sq=grad_sq,
                   cos=cos[0].float(), sin=sin[0].float(), nll=float(loss.detach()) / (len(ids) - 1))


def _sampled_fisher(logits: torch.Tensor, outputs: list[torch.Tensor], samples: int,
                    seed: int) -> list[torch.Tensor]:
    """Mean over `samples` label draws y ~ softmax(logits) of (dLoss_y/d output)^2."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logits.detach(), -1)
    acc = [torch.zeros_like(o[0], dtype=torch.float32) for o in outputs]
    for s in range(samples):
        for o in outputs:
            o.grad = None
        y = torch.multinomial(probs, 1, generator=gen)[:, 0]
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        loss.backward(retain_graph=s < samples - 1)
        for a, o in zip(acc, outputs):
            a += o.grad[0].detach().float() ** 2
    return [a / samples for a in acc]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def visibility(n_tokens: int, queries: torch.Tensor, policy: CachePolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query (a token index) and key: (quantized, fp16) boolean masks [Q, T] under
    the cache policy: sinks fp16; keys in the query's own block fp16 (the residual, causal);
    earlier blocks quantized while they are within the ring (window/block blocks), evicted
    after. Positions stay the original ones (a calibration proxy)."""
    s, b = policy.sinks, policy.block
    t = torch.arange(n_tokens)
    blk = torch.where(t >= s, (t - s) // b, torch.full_like(t, -1))
    qb = blk[queries][:, None]
    kb = blk[None, :]
    causal = t[None, :] <= queries[:, None]
    sink = (t < s)[None, :].expand(len(queries), -1)
    own = (kb == qb) & (kb >= 0) & causal
    ring = (kb >= 0) & (kb < qb)
    if policy.window is not None:
        ring &= (qb - kb) <= policy.window // b
    return ring, (sink & causal) | own


def _quantizable(n_tokens: int, policy: CachePolicy) -> slice:
    """Tokens that form whole blocks after the sinks (the ones a ring would hold)."""
    s, b = policy.sinks, policy.block
    n = max(0, (n_tokens - s) // b) * b
    return slice(s, s + n)


def key_weights(model, cap: Capture, policy: CachePolicy, distances: int = 128) -> torch.Tensor:
    """M = E[u u^T] per layer and KV head [L, H, D, D], u a calibration query (of the KV
    head's group) turned by RoPE over a key distance in [0, window): a pre-RoPE key error
    e moves that logit by u.e. In the quantized basis (Hadamard-rotated when the policy
    rotates). The weights of edgekv.key_feedback."""
    hq, _, d = cap.q[0].shape
    hkv = cap.k[0].shape[0]
    span = policy.window or 1024
    dist = torch.linspace(0, span - 1, distances).round()
    cos, sin = model.model.rotary_emb(cap.k[0][None], dist[None].long())
    cos, sin = cos[0].float()[:, None], sin[0].float()[:, None]  # [n, 1, D]
    h = None
    if policy.rotation == "hadamard":
        from edgekv.rotation import hadamard

        h = torch.from_numpy(hadamard(d))
    out = torch.empty(len(cap.q), hkv, d, d)
    for i, q in enumerate(cap.q):
        q = q[:, ::2].reshape(hkv, -1, d)  # the KV head's group of query heads, every 2nd token
        for j in range(hkv):
            u = _rope(q[j][None], cos, sin).reshape(-1, d)
            u = u if h is None else u @ h
            out[i, j] = u.T @ u / len(u)
    return out


def key_feedback(model, cap: Capture, policy: CachePolicy):
    """edgekv.key_feedback step matrices for `policy`'s geometry from calibration queries."""
    from edgekv.key_feedback import KeyFeedback, step_matrices

    return KeyFeedback(step_matrices(key_weights(model, cap, policy).double().numpy()))


def layer_sensitivity(cap: Capture, layer: int, policy: CachePolicy, queries: torch.Tensor,
                      widths=WIDTHS, clips=(1.0,), coarse_group: int | None = None,
                      per_head: bool = False) -> tuple[dict, dict]:
    """Predicted loss increase (nats per scored token) for keys and for values of one layer,
    the rest of the model unquantized: {(width, clip ratio): loss} for each width and each
    of `clipping.for_width(clips, width)` (ratio 1 only at 8 bits, more at 1 bit). Keys round as
    `policy.key_feedback` says. With `coarse_group`, values also at that group size, keyed
    (width, clip ratio, coarse_group). `per_head`: each loss is a tuple, one per KV head
    (a KV head's error reaches only its query heads' output channels, and the diagonal
    Fisher adds them up, so the tuple sums to the layer's loss; bench/head_widths.py);
    "both": (layer loss, per-head tuple)."""
    q, k, v, g2 = cap.q[layer], cap.k[layer], cap.v[layer], cap.grad_sq[layer]
    hq, n, d = q.shape
    rep = hq // k.shape[0]
    cos, sin = cap.cos, cap.sin
    qs = _rope(q[:, queries], cos[queries], sin[queries]) / d**0.5  # [Hq, Q, D]
    ring, full = visibility(n, queries, policy)
    visible = ring | full
    sl = _quantizable(n, policy)
    nblk = (sl.stop - sl.start) // policy.block

    def attend(keys: torch.Tensor) -> torch.Tensor:  # scores [Hq, Q, T]
        return qs @ _rope(keys, cos, sin).repeat_interleave(rep, 0).transpose(-1, -2)

    # The cache quantizes rotated blocks when the policy says so (edgekv.rotation).
    rotate = unrotate = (lambda x: x)  # noqa: E731
    if policy.rotation == "hadamard":
        from edgekv.rotation import hadamard

        h = torch.from_numpy(hadamard(d)).to(k.dtype)
        rotate, unrotate = (lambda x: x @ h), (lambda x: x @ h.T)  # noqa: E731

    s_f = attend(k)
    p_f = torch.softmax(s_f.masked_fill(~visible, float("-inf")), -1)
    v_rep = v.repeat_interleave(rep, 0)
    o_f = p_f @ v_rep
    g2 = g2[queries].view(len(queries), hq, d).transpose(0, 1)  # [Hq, Q, D]
    # Queries are a sample: scale up to the whole text, then per scored token.
    norm = 0.5 * (n / len(queries)) / (n - 1)

    def total(err2: torch.Tensor):  # Fisher-weighted squared output error [Hq, Q, D] -> loss
        loss = norm * (g2 * err2)
        heads = tuple(loss.unflatten(0, (-1, rep)).sum((1, 2, 3)).tolist()) if per_head else None
        return {False: float(loss.sum()), True: heads, "both": (float(loss.sum()), heads)}[per_head]

    k_rot, v_rot = rotate(k[:, sl]).reshape(-1, nblk, policy.block, d), rotate(v[:, sl])
    fb = policy.key_feedback
    fb = None if fb is None else torch.from_numpy(fb.layer(layer).copy())[:, None]  # [H, 1, D, D]
    k_loss, v_loss = {}, {}
    for w, c in ((w, c) for w in widths for c in clipping.for_width(clips, w)):
        if nblk == 0:
            heads = (0.0,) * k.shape[0]
            zero = {False: 0.0, True: heads, "both": (0.0, heads)}[per_head]
            k_loss[w, c] = v_loss[w, c] = zero
            if coarse_group is not None:
                v_loss[w, c, coarse_group] = zero
            continue
        kq = k.clone()
        kq[:, sl] = unrotate(qt.fake_quantize_keys(k_rot, w, policy.meta, c, fb, heads=-4)
                             .reshape(-1, nblk * policy.block, d))
        s_q = torch.where(full, s_f, attend(kq))
        o = torch.softmax(s_q.masked_fill(~visible, float("-inf")), -1) @ v_rep
        k_loss[w, c] = total((o - o_f) ** 2)
        for g in (policy.group,) if coarse_group is None else (policy.group, coarse_group):
            vq = v.clone()
            vq[:, sl] = unrotate(qt.fake_quantize_values(v_rot, w, g, policy.meta, policy.block, c))
            dv = (p_f * ring) @ (vq - v).repeat_interleave(rep, 0)
            v_loss[(w, c) if g == policy.group else (w, c, g)] = total(dv ** 2)
    return k_loss, v_loss


def calibration_ids(tokenizer, tokens: int = DEFAULT_TOKENS) -> list[int]:
    from edgekv.quality.text import calibration_text

    ids = tokenizer(calibration_text()).input_ids[:tokens]
    if len(ids) < 2:
        raise ValueError("calibration text gave fewer than 2 tokens")
    return ids


def query_positions(n_tokens: int, policy: CachePolicy, queries: int = DEFAULT_QUERIES) -> torch.Tensor:
    """The sampled query positions: evenly spaced over the part of the text that attends to a ring."""
    first = min(n_tokens - 1, policy.sinks + policy.block)
    return torch.linspace(first, n_tokens - 1, min(queries, n_tokens - first)).round().long().unique()


def measure(model, tokenizer, policy: CachePolicy, tokens: int = DEFAULT_TOKENS,
            queries: int = DEFAULT_QUERIES, widths=WIDTHS, fisher: str = DEFAULT_FISHER,
            clips=clipping.CANDIDATES, feedback: bool = True, coarse_group: int | None = None,
            heads: bool = False) -> Sensitivity:
    """Sensitivity of every layer's keys and values at every width, measured on the
    calibration text with `policy`'s geometry (sinks, block, group, window). Per side and
    width, the range ratio among `clips` with the least loss summed over layers is chosen
    (edgekv.clipping; (1.0,): plain min/max) and the sensitivities are the ones at it.
    `feedback`: keys round query-aware with step matrices fitted on the same queries
    (edgekv.key_feedback; returned as `Sensitivity.key_feedback`), else to nearest.
    `coarse_group`: values are also measured with scale/zero per that many channels, at the
    range ratio chosen for `policy.group` (`Sensitivity.value_coarse`). `heads`: also one
    row per (layer, KV head) at the same ratios (`Sensitivity.per_head`), from the same
    computation (layer_sensitivity's per-head split)."""
    t0 = time.perf_counter()
    ids = calibration_ids(tokenizer, tokens)
    n = len(ids)
    with torch.no_grad():
        cap = capture(model, ids, fisher=fisher)
        policy = policy.with_(key_feedback=key_feedback(model, cap, policy) if feedback else None)
        qidx = query_positions(n, policy, queries)
        both = [layer_sensitivity(cap, i, policy, qidx, widths, clips, coarse_group, per_head="both" if heads else False)
                for i in range(len(cap.q))]
    if heads:  # (layer losses, per-head losses) per layer and side
        per_layer = [tuple({key: x[0] for key, x in side.items()} for side in layer) for layer in both]
        per_layer_heads = [tuple({key: x[1] for key, x in side.items()} for side in layer) for layer in both]
    else:
        per_layer, per_layer_heads = both, []
    chosen, rows = [], {}
    for j, side in enumerate(clipping.SIDES):
        losses = [layer[j] for layer in per_layer]
        best = {w: min(clipping.for_width(clips, w), key=lambda c: sum(r[w, c] for r in losses))
                for w in widths}
        chosen += [(side, w, c) for w, c in best.items() if c != 1.0]
        rows[side] = tuple(tuple(r[w, best[w]] for w in widths) for r in losses)
        # per (layer, head), layer-major: each head's losses at the layer's chosen ratios
        head_losses = [layer[j] for layer in per_layer_heads]
        rows[side + "_heads"] = _head_rows(head_losses, lambda w: (w, best[w]), widths)
        if side == "v" and coarse_group is not None:
            rows["coarse"] = tuple(tuple(r[w, best[w], coarse_group] for w in widths) for r in losses)
            rows["coarse_heads"] = _head_rows(head_losses, lambda w: (w, best[w], coarse_group), widths)
    keys, values = rows["k"], rows["v"]
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE

    meta = {"method": f"diagonal-Fisher ({fisher}) estimate of the loss increase from each layer's "
                      "attention output, one side of one layer quantized at a time",
            "fisher": fisher, "text": DEFAULT_TEXT_SOURCE + ", calibration part (last 25 %)",
            "tokens": n, "queries": int(len(qidx)), "base_nll": cap.nll,
            "clip_candidates": list(clips), "key_rounding": "feedback" if feedback else "nearest",
            "seconds": round(time.perf_counter() - t0, 2)}
    return Sensitivity(tuple(widths), keys, values, meta, clip=tuple(chosen), key_feedback=policy.key_feedback,
                       coarse_group=coarse_group, value_coarse=rows.get("coarse", ()),
                       key_heads=rows["k_heads"], value_heads=rows["v_heads"],
                       value_coarse_heads=rows.get("coarse_heads", ()))


def _head_rows(per_layer: list[dict], key, widths) -> tuple[tuple[float, ...], ...]:
    """Rows (one per layer and KV head, layer-major) of per-head losses {key(w): tuple}."""
    return tuple(tuple(col) for layer in per_layer for col in zip(*(layer[key(w)] for w in widths)))


def coarse_group(base: CachePolicy, model, value_groups: bool) -> int | None:
    """The value group calibration also measures when it may choose groups per layer."""
    return base.coarse_value_group(kv_shape(model.config).head_dim) if value_groups else None


def calibrated_policy(model, tokenizer, base: CachePolicy, target: float,
                      sens: Sensitivity | None = None, select: bool = True,
                      clips=clipping.CANDIDATES, feedback: bool = True,
                      value_groups: bool = False, per_head: bool = False) -> tuple[CachePolicy, dict]:
    """(`base` with calibrated per-layer bits for an average of `target`, the manifest's
    'allocation' section: how the bits were chosen). `sens`: an earlier `measure` of the
    same geometry (else measured here with `clips`). `select`: choose among the allocation,
    a shrunk allocation and uniform by KL on further calibration tokens
    (edgekv.layout_selection); else the allocation. `value_groups`: each layer's values
    group by `base.group` or twice that (policy.groups_v), chosen with the widths within
    the same bytes (edgekv.allocation). `per_head`: widths per KV head are a candidate too
    (policy.units; needs `sens` measured with heads, as it is here when `sens` is None)."""
    from edgekv.layout_selection import SELECTION_TOKENS, select as select_layout

    sens = sens or measure(model, tokenizer, base, clips=clips, feedback=feedback,
                           coarse_group=coarse_group(base, model, value_groups), heads=per_head)
    if not per_head:
        sens = replace(sens, key_heads=(), value_heads=(), value_coarse_heads=())
    # every candidate layout quantizes as it was measured
    base = base.with_(clip=sens.clip, key_feedback=sens.key_feedback)
    fine_cost = base.scale_zero_bits(base.group) - base.scale_zero_bits(sens.coarse_group or base.group)
    policy, selection = None, None
    if select:  # on the calibration tokens after the ones the sensitivities used
        used = sens.meta.get("tokens", 0)
        held_out = calibration_ids(tokenizer, used + SELECTION_TOKENS)[used:]
        if len(held_out) >= 2 * base.block:  # the plain allocation is one of its candidates
            _, policy, selection = select_layout(model, held_out, sens, base, target, fine_cost)
    if policy is None:
        from edgekv.layout_selection import candidates

        cands = candidates(sens, base, target, fine_cost, kv_shape(model.config))  # the plain allocation first
        policy = next((p for name, p in cands.items() if "per head" in name), None) if per_head else None
        policy = policy or next(iter(cands.values()))
    in_use = {"k": set(policy.bits_k), "v": set(policy.bits_v)}  # ratios only for widths in use
    policy = policy.with_(clip=tuple(c for c in policy.clip if c[1] in in_use[c[0]]))
    shape = kv_shape(model.config)
    n = base.num_layers
    predicted = policy_loss(sens, policy, shape.num_kv_heads)
    uniform_loss = None
    if float(target).is_integer() and int(target) in sens.widths:
        uniform_loss = sens.predicted_loss((int(target),) * n, (int(target),) * n)
    return policy, {
        "layout": "calibrated", "target_bits": target, "average_bits": policy.average_bits(),
        "clip": [list(c) for c in policy.clip],
        "key_rounding": "nearest" if policy.key_feedback is None else "feedback",
        "bits_per_element_with_metadata": policy.bits_per_element(shape),
        "widths": list(sens.widths),
        "allocator": "exact multiple-choice knapsack: sum of widths <= target x 2 x layers, "
                     "least summed predicted loss" + ("" if not sens.value_coarse else
                     f"; value groups {base.group} or {sens.coarse_group} (-{fine_cost:g} bits) per layer"),
        "groups_v": list(policy.groups_v),
        **({"units": [[i, list(h)] for i, h in policy.units]} if policy.units else {}),
        "selection": selection,
        "predicted_loss_nats": predicted,
        "predicted_delta_ppl_pct": 100.0 * math.expm1(predicted),
        "uniform_predicted_delta_ppl_pct": None if uniform_loss is None else 100.0 * math.expm1(uniform_loss),
        "calibration": sens.meta,
        "sensitivity": {"key": [list(r) for r in sens.key], "value": [list(r) for r in sens.value]},
    }
