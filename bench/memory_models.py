"""The models of bench/bench_memory.py, each a function returning ``(model, loss_fn, data)`` (the
form ``pfkernels sharpness --model bench.memory_models:FUNCTION`` takes, from the repo root).

MLPs (tanh, 2 hidden layers, digits-shaped 64 -> 10, 256 random examples, MSE) of about 1M, 10M
and 100M parameters, and a GPT-2-small-shaped causal LM (Hugging Face ``GPT2LMHeadModel``: 12
layers, 768 wide, 12 heads, 50257-token vocabulary, tied embeddings: 124.4M parameters), random
initialisation, 4 random sequences of 32 tokens, next-token cross-entropy. Nothing is downloaded.
"""

from __future__ import annotations

import torch

from pfkernels.data import mlp, mse_loss

# width of a 2-hidden-layer MLP 64 -> w -> w -> 10: (64+1)w + (w+1)w + (w+1)10 parameters
MLP_WIDTHS = {"mlp1m": 960, "mlp10m": 3120, "mlp100m": 9960}


def _mlp(width: int):
    torch.manual_seed(0)
    model = mlp(in_features=64, out_features=10, width=width, depth=2, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (256,), generator=g), 10).float()
    return model, mse_loss, (x, y)


def mlp1m():
    return _mlp(MLP_WIDTHS["mlp1m"])


def mlp10m():
    return _mlp(MLP_WIDTHS["mlp10m"])


def mlp100m():
    return _mlp(MLP_WIDTHS["mlp100m"])


def _lm_loss(outputs, targets):
    logits = outputs.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets[:, 1:].reshape(-1))


def gpt2_124m():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, _lm_loss, (tokens, tokens)


MODELS = {"mlp1m": mlp1m, "mlp10m": mlp10m, "mlp100m": mlp100m, "gpt2_124m": gpt2_124m}
