"""Finite-difference Hessian-vector products: relative error against the step length ‖εv‖.

For three models (the digits MLP of bench_finite_difference.py; a GPT-2-shaped causal LM with
1 layer, width 32, vocabulary 1000, 4 x 16 tokens, the case of tests/test_finite_difference.py;
one with 2 layers, width 128, the real vocabulary of 50,257, 4 x 32 tokens, 6.8M parameters; all
random init) the relative error ``‖Hv_fd − Hv‖ / ‖Hv‖`` of ``HessianOperator(method=
"finite-difference", fd_eps=h)`` in float32 and float64 against float64 double backward, along
two random unit directions and the top eigenvector (exact eigsh), for a sweep of step lengths
``h`` and the two rules: ``old`` h = u^(1/3)(1 + ‖θ‖), ``rms`` h = u^(1/3)(1 + ‖θ‖/√n) (the
library's rule, pfkernels/finite_difference.py). Writes bench/results/fd_step_cpu.json.

    .venv/bin/python bench/bench_fd_step.py
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from _common import write_json

import pfkernels
from pfkernels.data import digits, mlp, mse_loss


def _lm_loss(outputs, targets):
    logits = outputs.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets[:, 1:].reshape(-1))


def _gpt2(n_layer, n_embd, vocab, seqs, tokens, n_positions):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4,
                                  n_positions=n_positions, vocab_size=vocab, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, vocab, (seqs, tokens), generator=torch.Generator().manual_seed(1))
    return model, _lm_loss, (ids, ids)


def _digits_mlp():
    x, y = digits(n_train=1000, n_test=0, dtype=torch.float64).train
    return mlp(width=200, depth=2, seed=0).double(), mse_loss, (x, y)


CASES = {
    "digits_mlp_2x200": _digits_mlp,
    "gpt2_1x32_vocab1000": lambda: _gpt2(1, 32, 1000, 4, 16, 16),
    "gpt2_2x128_vocab50257": lambda: _gpt2(2, 128, 50257, 4, 32, 64),
}
STEPS = {torch.float32: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
         torch.float64: [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]}


def run_case(name: str) -> dict:
    model, loss, data = CASES[name]()
    exact = pfkernels.HessianOperator(model, loss, data, method="double-backward",
                                      dtype=torch.float64)
    n = exact.num_parameters
    theta_norm = float(exact.source.point().norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        top = pfkernels.eigsh(exact, k=1, tol=1e-6, seed=0)
    g = torch.Generator().manual_seed(2)
    dirs = {f"random{i}": torch.randn(n, dtype=torch.float64, generator=g) for i in range(2)}
    dirs["top"] = top.eigenvectors[:, 0].double()
    dirs = {k: d / d.norm() for k, d in dirs.items()}
    want = {k: exact @ d for k, d in dirs.items()}
    print(f"{name}: n {n}, |theta| {theta_norm:.2f}, top eigenvalue "
          f"{float(top.eigenvalues[0]):.4g}, |Hv| " +
          ", ".join(f"{k} {float(w.norm()):.3g}" for k, w in want.items()), flush=True)
    rows = []
    for dtype, steps in STEPS.items():
        u = torch.finfo(dtype).eps / 2
        rules = {"old": u ** (1 / 3) * (1 + theta_norm),
                 "rms": u ** (1 / 3) * (1 + theta_norm / math.sqrt(n))}
        for h in sorted(steps + list(rules.values())):
            rule = next((r for r, s in rules.items() if s == h), "")
            fd = pfkernels.HessianOperator(model, loss, data, method="finite-difference",
                                           fd_eps=h, dtype=dtype)
            errors = {k: float(((fd @ d.to(dtype)).double() - want[k]).norm() / want[k].norm())
                      for k, d in dirs.items()}
            rows.append({"dtype": str(dtype).replace("torch.", ""), "step": h, "rule": rule,
                         "rel_error": errors})
            print(f"  {rows[-1]['dtype']} h={h:.3g} {rule:3s} " +
                  " ".join(f"{k} {e:.2e}" for k, e in errors.items()), flush=True)
    return {"parameters": n, "theta_norm": theta_norm,
            "theta_rms": theta_norm / math.sqrt(n),
            "top_eigenvalue": float(top.eigenvalues[0]),
            "hv_norm": {k: float(w.norm()) for k, w in want.items()}, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: run_case(name) for name in args.cases}
    write_json("fd_step_cpu.json", {"setting": {"threads": args.threads, "exact":
                                                "float64 double backward",
                                                "directions": "2 random unit, top eigenvector"},
                                    "results": results})


if __name__ == "__main__":
    main()
