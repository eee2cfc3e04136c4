#!/usr/bin/env python3
"""How small can the error of a 2-bit key code be? Real keys of a GGUF model.

The passkey grid (docs/ACCURACY.md) loses keys in step with the key error:
2-bit keys lose 45 of 360 prompts net, 3-bit keys 14, 4-bit keys 1. This
script asks whether any 2-bit code could bring the key error down to where
3-bit keys are. It runs the model in float64 numpy (tests/model/
check_logits.py's reference: the PyPI `gguf` reader, not our C code) over
the first --tokens tokens of a text, takes every layer's post-RoPE keys and
applies the OScaR transform (a per-head Hadamard rotation, then one norm
per token over all KV heads). Then, per channel and group of --k-group
tokens (the cache's key groups), it measures, as a fraction of the keys'
energy:

  uniform b-bit   the cache's code: min/max of the group, 2^b - 1 even steps
                  (float64 parameters; the library stores them as f16)
  best 4-level    the least error any 4-level scalar code can reach on the
                  group: exact 1-D k-means of its values (dynamic program
                  over the sorted values), with its 4 levels stored for free
  Gaussian R-D    variance / 16: the distortion-rate function at 2 bits per
                  element of a Gaussian source with each group's variance
                  (what a vector code could reach if the keys were Gaussian;
                  a non-Gaussian source can be coded below it)
  lag-1 share     the share of the groups' variance that predicting each
                  token from the one before removes (per channel and layer,
                  the least-squares coefficient, from the exact previous
                  value: an optimistic bound): what a predictive code along
                  the sequence could gain; below 0 it adds variance

usage: key-error-bound.py --oscar build/oscar --model M.gguf --text T.txt [--tokens 2048]
Needs numpy and gguf (pip install numpy gguf); exits 77 without them.
Prints one line per group size (and progress on stderr).
"""
import argparse
import os
import sys
import tempfile
import types

try:
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "model"))
    import check_logits
except ImportError as e:
    print(f"key-error-bound: skipped: {e} (pip install numpy gguf)", file=sys.stderr)
    sys.exit(77)


class KeyCapture(check_logits.Ref):
    """The float64 reference, keeping each layer's keys after RoPE."""

    def rope_hf(self, x, pos, base=None):
        y = super().rope_hf(x, pos, base)
        if x.shape[1] == self.n_kv:  # the keys (the queries have n_heads heads)
            self.keys.append(y.copy())
            print(f"key-error-bound: layer {len(self.keys)} of {self.n_layers}", file=sys.stderr, flush=True)
        return y


def hadamard(d):
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def uniform_error(groups, bits):
    """Squared error of min/max uniform codes, one group per row."""
    lo, hi = groups.min(1, keepdims=True), groups.max(1, keepdims=True)
    levels = 2 ** bits - 1
    step = (hi - lo) / levels
    step[step == 0] = 1.0  # a constant group is exact
    code = np.clip(np.round((groups - lo) / step), 0, levels)
    return float(((lo + code * step - groups) ** 2).sum())


def best_scalar_error(groups, levels):
    """Least squared error of any `levels`-level scalar code of each row."""
    v = np.sort(groups, 1)
    rows, n = v.shape
    c1 = np.concatenate([np.zeros((rows, 1)), np.cumsum(v, 1)], 1)
    c2 = np.concatenate([np.zeros((rows, 1)), np.cumsum(v * v, 1)], 1)
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    total = c1[:, None, :] - c1[:, :, None]  # [row, i, j]: sum of sorted values i .. j-1
    cost = c2[:, None, :] - c2[:, :, None] - total * total / np.maximum(j - i, 1)
    cost = np.where((j > i)[None], cost, np.inf)
    best = np.full((rows, n + 1), np.inf)  # best[row, j]: the first j values in k clusters
    best[:, 0] = 0.0
    for _ in range(levels):
        best = np.min(best[:, :, None] + cost, axis=1)
        best[:, 0] = np.inf
    return float(best[:, n].sum())


def lag1_residual_variance(x, gk):
    """Within-group variance left after predicting each token of x [T, channels]
    from the previous one; the coefficient (one per channel) is the least-
    squares one for the deviations from the group means, which is what the
    group codes see. The first token is kept as it is."""
    T = x.shape[0]
    g = x.reshape(T // gk, gk, -1)
    dev = (g - g.mean(1, keepdims=True)).reshape(T, -1)
    prev, cur = dev[:-1], dev[1:]
    denom = (prev * prev).sum(0)
    coef = np.where(denom > 0, (prev * cur).sum(0) / np.where(denom > 0, denom, 1.0), 0.0)
    res = np.vstack([x[:1], x[1:] - coef * x[:-1]]).reshape(T // gk, gk, -1)
    return float(((res - res.mean(1, keepdims=True)) ** 2).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oscar", required=True, help="the oscar binary (tokenises the text)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--k-group", type=int, action="append", help="key group sizes (default 32 and 64)")
    a = ap.parse_args()
    if a.tokens < 64:
        ap.error("--tokens must be at least 64")
    group_sizes = a.k_group or [32, 64]

    with open(a.text, encoding="utf-8", errors="replace") as f:
        text = f.read(a.tokens * 16)
    with tempfile.TemporaryDirectory() as td:
        ids = check_logits.run_tokens(types.SimpleNamespace(oscar=a.oscar, model=a.model), text, td, "keys")
    if len(ids) < a.tokens:
        sys.exit(f"key-error-bound: the text gives {len(ids)} tokens, fewer than --tokens {a.tokens}")
    ids = ids[: a.tokens]
    ref = KeyCapture(a.model)
    ref.keys = []
    ref.forward(ids, all_logits=False)
    rot = hadamard(ref.hd)
    print(f"{os.path.basename(a.model)}: {len(ref.keys)} layers, {a.tokens} tokens of {os.path.basename(a.text)}, "
          f"{ref.n_kv} KV heads x {ref.hd}; errors as a fraction of the transformed keys' energy")
    for gk in group_sizes:
        acc = dict(energy=0.0, u2=0.0, u3=0.0, u4=0.0, best4=0.0, rd2=0.0, var=0.0, res_var=0.0)
        for k in ref.keys:
            T = (k.shape[0] // gk) * gk
            x = k[:T] @ rot.T  # per-head Hadamard rotation: [T, hkv, d]
            x = x / np.sqrt((x * x).sum((1, 2)))[:, None, None]  # one norm per token over all KV heads
            groups = x.reshape(T // gk, gk, -1).transpose(0, 2, 1).reshape(-1, gk)
            acc["energy"] += float((x * x).sum())
            acc["u2"] += uniform_error(groups, 2)
            acc["u3"] += uniform_error(groups, 3)
            acc["u4"] += uniform_error(groups, 4)
            acc["best4"] += best_scalar_error(groups, 4)
            var = float(((groups - groups.mean(1, keepdims=True)) ** 2).sum())
            acc["rd2"] += var / 16.0
            acc["var"] += var
            acc["res_var"] += lag1_residual_variance(x.reshape(T, -1), gk)
        e = acc["energy"]
        print(f"k_group {gk}: uniform 2-bit {acc['u2'] / e:.4f}  3-bit {acc['u3'] / e:.4f}  4-bit {acc['u4'] / e:.5f}  "
              f"| best 4-level scalar {acc['best4'] / e:.4f}  Gaussian R-D at 2 bits {acc['rd2'] / e:.4f}  "
              f"| lag-1 share {1.0 - acc['res_var'] / acc['var']:.4f}")


if __name__ == "__main__":
    main()
