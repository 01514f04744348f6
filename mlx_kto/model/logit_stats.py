"""TRL's logit metrics for a micro-batch: `logits/chosen`, `logits/rejected` and `entropy`.

    logits/<side> = mean over the completion tokens of <side>'s rows of mean_v logits[t, v]
    entropy       = mean over all completion tokens of H(p_t),  H(p) = logsumexp(z) - Σ_v p_v z_v
                    (p_t = softmax(logits[t]), TRL's per-token entropy of the policy)

The training step's fused LM head never materialises the full [B, T, V] logits, so these come
from one extra no-gradient forward, taken only on reporting steps (`steps_per_report`): the
hot path is unchanged. Target positions are t-1 for a completion token at t, as in logprobs.
A packed micro-batch (data/packing.py) takes that forward packed (`packed_logit_stats`): real
tokens only, the head on completion targets only, pieces on the row streams. Padded, the
forward of 8 real SmolLM2 rows took 19 s, longer than the training step it reports on.
"""

from __future__ import annotations

from mlx_kto.model.logprobs import default_chunk_size, hidden_states, lm_head, vocab_size
from mlx_kto.model.packed import packed_hidden_states
from mlx_kto.runtime.streams import row_streams

import mlx.core as mx

ROWS_PER_CHUNK = 4  # rows per forward: bounds the [rows, T, V] float32 logits held at once


def logit_stats(model, tokens: mx.array, mask: mx.array, labels: mx.array) -> dict[str, float]:
    """{logits/chosen, logits/rejected, entropy} of the policy on one batch (no gradient).
    tokens, mask [B, T] (mask: completion tokens), labels [B] (True = chosen). A side with
    no rows is left out, as TRL logs nothing for it."""
    head = lm_head(model)
    sums = {"chosen": 0.0, "rejected": 0.0, "entropy": 0.0}
    counts = {"chosen": 0.0, "rejected": 0.0, "entropy": 0.0}
    for s in range(0, tokens.shape[0], ROWS_PER_CHUNK):
        toks, m = tokens[s : s + ROWS_PER_CHUNK], mask[s : s + ROWS_PER_CHUNK, 1:]
        lab = labels[s : s + ROWS_PER_CHUNK].astype(mx.float32)[:, None]  # [b, 1]
        h = mx.stop_gradient(hidden_states(model, toks[:, :-1]))  # [b, T-1, H] (or logits)
        step = default_chunk_size(toks.shape[0], vocab_size(model)) or h.shape[1]
        for p in range(0, h.shape[1], step):  # large vocabularies: a few positions at a time
            z = head(h[:, p : p + step]).astype(mx.float32)  # [b, P, V]
            w = m[:, p : p + step].astype(mx.float32)  # [b, P]: t-1 predicts completion token t
            mean_z = z.mean(axis=-1)  # [b, P]
            lse = mx.logsumexp(z, axis=-1, keepdims=True)  # [b, P, 1]
            ent = lse[..., 0] - (mx.exp(z - lse) * z).sum(axis=-1)  # [b, P]
            parts = [
                (mean_z * w * lab).sum(), (w * lab).sum(),
                (mean_z * w * (1 - lab)).sum(), (w * (1 - lab)).sum(),
                (ent * w).sum(), w.sum(),
            ]  # fmt: skip
            mx.eval(parts)
            v = [x.item() for x in parts]
            for i, key in enumerate(("chosen", "rejected", "entropy")):
                sums[key] += v[2 * i]
                counts[key] += v[2 * i + 1]
    return _finish(sums, counts)


def _finish(sums: dict, counts: dict) -> dict[str, float]:
    out = {}
    for key, name in (("chosen", "logits/chosen"), ("rejected", "logits/rejected")):
        if counts[key] > 0:
            out[name] = sums[key] / counts[key]
    if counts["entropy"] > 0:
        out["entropy"] = sums["entropy"] / counts["entropy"]
    return out


def _target_parts(head, h: mx.array, w: mx.array, lab: mx.array) -> list[mx.array]:
    """The six sums of one chunk of target positions: h [b, P, H], w and lab [b, P] float32."""
    z = head(h).astype(mx.float32)  # [b, P, V]
    mean_z = z.mean(axis=-1)  # [b, P]
    lse = mx.logsumexp(z, axis=-1, keepdims=True)  # [b, P, 1]
    ent = lse[..., 0] - (mx.exp(z - lse) * z).sum(axis=-1)  # [b, P]
    return [
        (mean_z * w * lab).sum(), (w * lab).sum(),
        (mean_z * w * (1 - lab)).sum(), (w * (1 - lab)).sum(),
        (ent * w).sum(), w.sum(),
    ]  # fmt: skip


def packed_logit_stats(model, passes: list[list[dict]], labels: mx.array) -> dict[str, float]:
    """`logit_stats` of a packed micro-batch (the arrays of `Batch.packed`'s pieces, pass by
    pass; the model packing: model/packed.py `can_pack`), the same numbers: each piece's hidden
    states at its completion targets (`tgt_pos`; `tgt_row` -1 = an unused slot, weight 0),
    through the head a chunk of positions at a time, the pieces on the row streams."""
    head = lm_head(model)
    streams = (row_streams() if mx.default_device() == mx.cpu else []) or [
        mx.default_stream(mx.default_device())
    ]
    total = [0.0] * 6
    for pieces in passes:
        hs, ws, labs = [], [], []
        for k, pk in enumerate(pieces):
            with mx.stream(streams[k % len(streams)]):
                h = mx.stop_gradient(packed_hidden_states(model, pk))  # [1, T, H]
                hs.append(mx.take_along_axis(h, pk["tgt_pos"][..., None], axis=1))  # [1, M, H]
                row = pk["tgt_row"]  # [1, M]
                ws.append((row >= 0).astype(mx.float32))  # [1, M]
                labs.append(labels[mx.maximum(row, 0)].astype(mx.float32))  # [1, M]
        M = max(h.shape[1] for h in hs)
        step = default_chunk_size(1, vocab_size(model)) or M
        for p in range(0, M, step):  # large vocabularies: a few positions at a time
            parts = []
            for k, (h, w, lab) in enumerate(zip(hs, ws, labs)):
                if p < h.shape[1]:
                    with mx.stream(streams[k % len(streams)]):
                        c = slice(p, p + step)
                        parts += _target_parts(head, h[:, c], w[:, c], lab[:, c])
            mx.eval(parts)
            for i, x in enumerate(parts):
                total[i % 6] += x.item()
    sums = {"chosen": total[0], "rejected": total[2], "entropy": total[4]}
    counts = {"chosen": total[1], "rejected": total[3], "entropy": total[5]}
    return _finish(sums, counts)
