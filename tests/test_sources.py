"""Data and model handling shared by every curvature operator: Hugging Face models without glue
(mapping batches, model(**batch).loss, tiny GPT-2 and ViT configs with random weights), tuple
inputs, DataLoaders of dicts, compiled models, parameter filters, dropout and BatchNorm modes."""

import copy
import warnings

import pytest
import torch
from torch import nn

import pfkernels
from pfkernels import GGNOperator, HessianOperator, eigsh, losses
from pfkernels.data import mlp, mse_loss

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def gpt2(seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def vit(seed):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    return model, {"pixel_values": torch.randn(4, 3, 8, 8, generator=g),
                   "labels": torch.randint(0, 3, (4,), generator=g)}


def test_hf_model_loss_none_matches_explicit_loss(gpt2):
    model, batch = gpt2
    op = HessianOperator(model, None, batch)
    explicit = HessianOperator(model, losses.causal_lm_loss, batch)
    v = torch.randn(op.shape[0])
    assert rel(op @ v, explicit @ v) < 1e-5
    assert abs(float(op.loss()) - float(model(**batch).loss.detach())) < 1e-5
    res = eigsh(op, k=1, tol=1e-3, seed=0)
    assert bool(res.converged.all())


def test_hf_float64_loss_in_float64(gpt2):
    model, batch = gpt2
    with pytest.warns(UserWarning, match="float32"):
        HessianOperator(model, None, batch, dtype=torch.float64)
    op = HessianOperator(model, losses.causal_lm_loss, batch, dtype=torch.float64)
    ref = HessianOperator(copy.deepcopy(model).double(), losses.causal_lm_loss, batch)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert rel(op @ v, ref @ v) < 1e-12  # float64 all the way: not float32 in the loss


def test_hf_dataloader_of_dicts_and_bad_batches(gpt2):
    model, batch = gpt2
    rows = [{k: t[i] for k, t in batch.items()} for i in range(3)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    op = HessianOperator(model, None, loader)
    listed = HessianOperator(model, None, [{k: t[:2] for k, t in batch.items()},
                                           {k: t[2:] for k, t in batch.items()}])
    v = torch.randn(op.shape[0])
    assert rel(op @ v, listed @ v) < 1e-5
    # Wrong forms fail at construction, naming the argument, not at the first product.
    with pytest.raises(ValueError, match=r"'data'.*mappings"):
        HessianOperator(model, None, (batch["input_ids"], batch["labels"]))
    with pytest.raises(ValueError, match=r"'data'.*labels"):
        HessianOperator(model, losses.causal_lm_loss, {"input_ids": batch["input_ids"]})
    bad_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(batch["input_ids"]),
                                             batch_size=2)
    with pytest.raises(ValueError, match="'data'"):
        HessianOperator(model, None, bad_loader)


def test_dataloader_peek_keeps_global_rng(seed):
    model = mlp(3, 2, width=4, depth=1, seed=1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4,
                                         shuffle=True)
    state = torch.get_rng_state()
    HessianOperator(model, mse_loss, loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_ggn_on_hf_models_recognises_their_loss(gpt2, vit):
    for model, batch, loss in [(*gpt2, losses.causal_lm_loss), (*vit, losses.classification_loss)]:
        op = GGNOperator(model, None, batch)
        explicit = GGNOperator(model, loss, batch)
        # the generic path (loss differentiated twice on the outputs) checks the closed form
        generic = GGNOperator(model, lambda out, t, loss=loss: loss(out, t), batch)
        v = torch.randn(2, op.shape[0])
        gv = op @ v
        assert rel(gv, explicit @ v) < 1e-6
        assert rel(gv, generic @ v) < 1e-5
        assert float((gv * v).sum(1).min()) >= 0
    with pytest.raises(ValueError, match="loss_fn"):
        GGNOperator(transformers.GPT2Model(gpt2[0].config), None, {"input_ids": gpt2[1][
            "input_ids"]})


def test_tuple_inputs_are_one_batch(seed):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, xs):
            x1, x2 = xs
            return torch.tanh(self.a(x1)) * self.b(x2)

    model = TwoInputs().double()
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(5, 3, generator=g).double(), torch.randn(5, 4, generator=g).double()
    y = torch.randn(5, 2, generator=g).double()
    op = HessianOperator(model, mse_loss, ((x1, x2), y))
    two = HessianOperator(model, mse_loss, [((x1[:2], x2[:2]), y[:2]), ((x1[2:], x2[2:]), y[2:])])
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert rel(op @ v, two @ v) < 1e-12
    assert abs(float(op.loss()) - float(mse_loss(model((x1, x2)), y).detach())) < 1e-12


def test_compiled_model_is_unwrapped(seed):
    model = mlp(3, 2, width=4, depth=1, seed=seed % 1000).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    compiled = torch.compile(model)
    op = HessianOperator(compiled, mse_loss, (x, y))
    ref = HessianOperator(model, mse_loss, (x, y))
    assert op.model is model
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.equal(op @ v, ref @ v)


def test_params_callable_selects_trainable_only(seed):
    model = mlp(3, 2, width=4, depth=2, seed=seed % 1000).double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    op = HessianOperator(model, mse_loss, (x, y), params=lambda name: name.endswith("weight"))
    assert "0.weight" not in op.param_names and "2.weight" in op.param_names
    listed = HessianOperator(model, mse_loss, (x, y), params=["0.weight"])  # named: included
    assert listed.param_names == ["0.weight"]
    with pytest.raises(ValueError, match="params"):
        HessianOperator(model, mse_loss, (x, y), params=lambda name: name == "0.weight")


class BNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = (nn.Linear(4, 6), nn.BatchNorm1d(6),
                                                  nn.Dropout(0.5), nn.Linear(6, 2))

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def test_dropout_warning_and_batch_stats_mode(seed):
    model = BNDrop().double()
    model.bn.running_mean.normal_()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="dropout"):
        HessianOperator(model, mse_loss, (x, y), mode="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = HessianOperator(model, mse_loss, (x, y), mode="batch-stats")
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)  # deterministic: dropout off
    # the same as train mode without dropout: batch statistics
    nodrop = copy.deepcopy(model)
    nodrop.drop.p = 0.0
    ref = HessianOperator(nodrop, mse_loss, (x, y), mode="train")
    assert rel(op @ v, ref @ v) < 1e-12
    evalop = HessianOperator(model, mse_loss, (x, y))
    assert rel(op @ v, evalop @ v) > 1e-6  # running statistics differ from batch statistics
    running = model.bn.running_mean.clone()
    op @ v
    assert torch.equal(model.bn.running_mean, running) and model.training


def test_dal_on_hf_transformer_with_fused_attention(gpt2):
    model, batch = gpt2
    model.config.attn_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    opt = pfkernels.optim.DAL(model.parameters(), p=1.0)
    loss0 = float(model(**batch).loss.detach())
    for _ in range(3):
        opt.step(lambda: model(**batch).loss)
    assert float(model(**batch).loss.detach()) < loss0


def test_sdpa_math_routing_in_output_operators(gpt2):
    """GGN's forward-mode JVP through GPT-2's SDPA attention needs the math path too."""
    model, batch = gpt2
    op = GGNOperator(model, losses.causal_lm_loss, batch, mode="eval")
    v = torch.randn(op.shape[0])
    assert torch.isfinite(op @ v).all()



def test_tracker_piggyback_on_fused_attention_measures_on_data(gpt2):
    """The caller's loss ran SDPA's fused kernel (not twice differentiable): the piggybacked
    measurement falls back to the data, whose products route attention to the math path."""
    model, batch = gpt2
    tracker = pfkernels.SharpnessTracker(model, None, batch, threshold=10.0, tol=1e-2)
    reference = pfkernels.SharpnessTracker(model, None, batch, threshold=10.0, tol=1e-2)
    loss = model(**batch).loss
    record = tracker.step(0, loss=loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert record["sharpness"] == pytest.approx(reference.step(0)["sharpness"], rel=1e-2)


def test_fisher_operators_on_hf_causal_lm(gpt2):
    model, batch = gpt2
    batch["labels"][0, 3] = -100
    v = torch.randn(2, sum(p.numel() for p in model.parameters()))
    for op in (pfkernels.MCFisherOperator(model, None, batch, mc_samples=2, seed=1),
               pfkernels.EmpiricalFisherOperator(model, None, batch)):
        fv = op @ v
        assert torch.equal(fv, op @ v)
        assert float((fv * v).sum(1).min()) >= 0
        # symmetric: u·(F v) = v·(F u)
        assert abs(float(v[0] @ fv[1] - v[1] @ fv[0])) < 1e-4 * float(fv.norm() * v.norm())
