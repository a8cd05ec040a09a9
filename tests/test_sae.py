import pytest
import torch

from univ.errors import UnivError
from univ.sae import SAE, SAEConfig, geometric_median


def _sae(arch="relu", normalisation="token", d=16, n=48):
    sae = SAE(SAEConfig(arch=arch, d_in=d, d_sae=n, k=5 if arch == "topk" else None,
                        l1=1.0 if arch == "relu" else None, normalisation=normalisation))
    g = torch.Generator().manual_seed(0)
    sae.initialise(torch.randn(256, d, generator=g) * 3 + 1, g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("normalisation", ["token", "dataset", "none"])
def test_save_load_round_trip(tmp_path, arch, normalisation):
    sae = _sae(arch, normalisation)
    x = torch.randn(10, 16) * 5
    sae.save(tmp_path / "s")
    again = SAE.load(tmp_path / "s")
    assert again.cfg == sae.cfg
    torch.testing.assert_close(again.encode(x), sae.encode(x))
    torch.testing.assert_close(again.reconstruct(x), sae.reconstruct(x))
    if arch == "topk":
        assert ((sae.encode(x) > 0).sum(-1) <= 5).all()


def test_token_normalisation_is_undone_on_decode():
    """x̃ has norm √d whatever x's norm; decode multiplies the token's scale back, so the
    reconstruction scales with the input."""
    sae = _sae("relu", "token")
    x = torch.randn(8, 16)
    f = sae.encode(x)
    torch.testing.assert_close(sae.encode(7.0 * x), f)  # features see the normalised token
    torch.testing.assert_close(sae.decode(f, sae.scale(x)), sae.reconstruct(x))
    torch.testing.assert_close(sae.reconstruct(7.0 * x), 7.0 * sae.reconstruct(x))
    with pytest.raises(ValueError, match="scale"):
        sae.decode(f)


def test_dataset_normalisation_uses_one_constant():
    sae = _sae("topk", "dataset")
    assert sae.data_scale.item() != 1.0
    x = torch.randn(8, 16)
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae.reconstruct(x))
    x_norm = x / sae.data_scale
    inner = torch.relu(sae.activate(sae.pre_acts(x_norm))) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae.reconstruct(x), inner * sae.data_scale)


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.zeros(50, 2), torch.tensor([[1000.0, 1000.0]])])
    assert geometric_median(pts).norm() < 1e-2 < pts.mean(0).norm()


@pytest.mark.parametrize("kw, message", [
    (dict(arch="topk", k=48), "--k"), (dict(arch="topk", k=0), "--k"), (dict(arch="gated"), "architecture"),
    (dict(arch="relu", l1=-1.0), "--l1"), (dict(arch="relu", l1=1.0, normalisation="l2"), "normalisation"),
])
def test_bad_configs(kw, message):
    with pytest.raises(UnivError, match=message):
        SAE(SAEConfig(d_in=16, d_sae=48, **kw))


def dense_topk(sae, x, k):
    """The plain autograd TopK forward: (normalised x, pre-activations, dense features)."""
    xn = x / sae.scale(x)
    pre = (xn - sae.b_dec) @ sae.W_enc + sae.b_enc
    idx = pre.topk(k, dim=-1).indices
    return xn, pre, torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))


def test_sparse_topk_backward_equals_dense_autograd():
    from univ.sae_train import TrainConfig, step_loss

    sae = _sae("topk", "dataset", d=12, n=40)
    with torch.no_grad():
        sae.W_dec.mul_(1.3)
    x = torch.randn(64, 12, dtype=torch.float64).float() * 2
    tc = TrainConfig(lr=1e-3, total_steps=10, dead_tokens=0)  # every latent dead: AuxK on
    since = torch.zeros(40, dtype=torch.long)
    loss, _ = step_loss(sae, x, tc, 0, since)
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    sae.zero_grad()
    xn, pre, f = dense_topk(sae, x, 5)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x_hat - xn).pow(2).sum(-1).mean()
    resid = (xn - x_hat).detach()
    aux_idx = pre.detach().topk(20, dim=-1).indices
    fa = torch.zeros_like(pre).scatter(-1, aux_idx, torch.relu(pre.gather(-1, aux_idx)))
    aux = (fa @ sae.W_dec - resid).pow(2).sum(-1).mean() / (resid - resid.mean(0)).pow(2).sum(-1).mean()
    (mse + tc.aux_coef * aux).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_auxk_dead_window_scales_with_a_short_run():
    from univ.sae_train import train_config

    assert train_config("topk", 1e-3, 100_000, 4096, torch.float32).dead_tokens == 1_000_000
    assert train_config("topk", 1e-3, 100, 512, torch.float32).dead_tokens == 5120  # a tenth of 51,200 tokens
