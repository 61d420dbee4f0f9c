"""The optional training-framework callbacks: nothing heavy at import, the Hugging Face
TrainerCallback driven through its hooks as Trainer calls them, on a tiny GPT-2."""

import subprocess
import sys

import pytest
import torch

import pfkernels
from pfkernels import integrations

transformers = pytest.importorskip("transformers")


def test_import_pfkernels_imports_no_framework():
    code = ("import sys, pfkernels, pfkernels.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_trainer_callback_tracks_gpt2(seed):
    from transformers.trainer_callback import TrainerControl, TrainerState

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)  # train mode, as Trainer leaves it
    ids = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = integrations.SharpnessTrainerCallback(batch, every=2, k=1, tol=1e-2)
    assert isinstance(callback, transformers.TrainerCallback)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control, model=model, optimizer=opt)
    logs = []
    for step in range(4):
        state.global_step = step
        opt.zero_grad()
        model(**batch).loss.backward()
        callback.on_pre_optimizer_step(None, state, control)
        opt.step()
        entry = {"loss": 0.0}
        callback.on_log(None, state, control, logs=entry)
        logs.append(entry)
    history = callback.tracker.history
    assert [r["step"] for r in history] == [0, 2]
    assert history[1]["preconditioned_sharpness"] > 0  # AdamW: the preconditioned operator
    assert "eos/threshold" in logs[0] and "eos/threshold" not in logs[1]
    assert model.training  # the measurement restored the Trainer's mode


def test_lightning_callback_moved_but_reachable():
    assert "SharpnessCallback" in integrations.__all__
    with pytest.raises(AttributeError, match="has no attribute"):
        pfkernels.integrations.NoSuchCallback  # noqa: B018
