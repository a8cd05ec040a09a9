import time

import pytest
import torch

from conftest import build_mamba_ssm
from univ import architectures, hub, models
from univ.errors import UnivError


def _tokens(assets, n=3, length=12):
    ids = assets["tokenizer"](assets["docs"][:n], add_special_tokens=False)["input_ids"]
    return torch.tensor([[0] + x[: length - 1] for x in ids if len(x) >= length - 1][:2])


def test_aliases_point_at_the_study_checkpoints():
    assert models.ALIASES["pythia-160m"] == "EleutherAI/pythia-160m"
    assert models.ALIASES["mamba-130m"] == "state-spaces/mamba-130m-hf"
    assert models.ALIASES["pythia-160m-seed3"] == "EleutherAI/pythia-160m-seed3"
    assert models.ALIASES["mamba-2.8b"] == "state-spaces/mamba-2.8b-hf"


@pytest.mark.parametrize("alias, params", [("pythia-70m", 70e6), ("pythia-160m", 162e6), ("pythia-410m", 405e6),
                                           ("mamba-130m", 130e6), ("mamba-370m", 370e6)])
def test_shipped_architectures_have_the_published_size(alias, params):
    """random:ALIAS needs no Hub: its architecture ships with univ, and its size is the name's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert set(models.ALIASES) == set(architectures.CONFIGS)
    src = models.resolve(models.RANDOM_PREFIX + alias)  # HF_HUB_OFFLINE=1 here, and nothing cached
    assert src.random_init and src.path is None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**src.config))
    assert abs(sum(p.numel() for p in model.parameters()) / params - 1) < 0.02


def test_an_unreachable_hub_fails_fast_and_says_so(monkeypatch):
    from huggingface_hub import constants

    def no_route(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(hub.socket, "create_connection", no_route)
    hub.reachable.cache_clear()
    try:
        start = time.monotonic()
        for name in ("pythia-160m", "someone/a-model"):  # neither an alias nor a Hub id is blamed
            with pytest.raises(UnivError, match="the Hub cannot be reached from this machine; set HF_HUB_OFFLINE=1"):
                models.resolve(name)
        assert time.monotonic() - start < 5  # huggingface_hub's own retries took ~25 s
        assert constants.HF_HUB_OFFLINE  # the rest of the process stays off the network
    finally:
        hub.reachable.cache_clear()


@pytest.mark.parametrize("family", ["neox", "mamba"])
def test_resid_post_is_the_output_of_each_block(assets, family):
    """resid_post[l] is what block l returns: block l+1's input, and for the last block the
    stream that the final norm and the unembedding turn into the logits."""
    lm = models.load(str(assets[family]), device="cpu")
    tokens = _tokens(assets)
    resid = lm.resid(tokens, list(range(lm.n_layers)))
    assert resid.shape == (lm.n_layers, *tokens.shape, lm.d_model)

    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, (a[0] if a else kw["hidden_states"])),
                                         with_kwargs=True) for i, b in enumerate(lm.blocks())]
    logits = lm.model(input_ids=tokens).logits
    for h in hooks:
        h.remove()
    for layer in range(lm.n_layers - 1):
        torch.testing.assert_close(resid[layer], inputs[layer + 1].to(resid.dtype))
    assert not torch.allclose(resid[0], inputs[0])
    final_norm = lm.model.gpt_neox.final_layer_norm if family == "neox" else lm.model.backbone.norm_f
    head = lm.model.get_output_embeddings()
    torch.testing.assert_close(head(final_norm(resid[-1])), logits, rtol=1e-4, atol=1e-4)


def test_resid_subset_matches_all_layers(assets):
    lm = models.load(str(assets["mamba"]), device="cpu")
    tokens = _tokens(assets)
    full = lm.resid(tokens, [0, 1, 2])
    torch.testing.assert_close(lm.resid(tokens, [1]), full[1:2])


def test_original_mamba_ssm_checkpoint_converts_on_load(assets, tmp_path):
    ssm_dir = build_mamba_ssm(tmp_path / "mamba-ssm", assets["mamba"])
    src = models.resolve(str(ssm_dir))
    assert (src.layout, src.family, src.n_layers) == ("mamba_ssm", "mamba", 3)
    ours, ref = models.load(str(ssm_dir), device="cpu"), models.load(str(assets["mamba"]), device="cpu")
    tokens = _tokens(assets)
    torch.testing.assert_close(ours.resid(tokens, [0, 1, 2]), ref.resid(tokens, [0, 1, 2]))
    torch.testing.assert_close(ours.model(input_ids=tokens).logits, ref.model(input_ids=tokens).logits)


def test_mamba_ssm_checkpoint_without_tokenizer_needs_gpt_neox_20b(assets, tmp_path):
    ssm_dir = build_mamba_ssm(tmp_path / "bare", assets["mamba"], with_tokenizer=False)
    with pytest.raises(UnivError, match="gpt-neox-20b"):
        models.load_tokenizer(models.resolve(str(ssm_dir)))


def test_tokenizer_fingerprint_tells_tokenizers_apart(assets):
    fp = [models.tokenizer_fingerprint(models.load_tokenizer(models.resolve(str(assets[k]))))
          for k in ("neox", "mamba", "neox_other")]
    assert fp[0] == fp[1] != fp[2]


@pytest.mark.parametrize("name, message", [
    ("no-such-model-alias", "could not be fetched"),
    ("./no/such/dir", "does not exist"),
])
def test_unknown_models_are_clear_errors(name, message):
    with pytest.raises(UnivError, match=message):
        models.resolve(name)


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UnivError, match="not supported"):
        models.resolve(str(tmp_path))


@pytest.mark.parametrize("family, width", [("neox", 64), ("mamba", 128)])
def test_neurons_are_mlp_post_activations_or_conv_and_gate(assets, family, width):
    lm = models.load(str(assets[family]), device="cpu")
    tokens = _tokens(assets)
    neurons = lm.activations("neurons", tokens, [0, 1])
    assert neurons.shape == (2, *tokens.shape, width)
    if family == "mamba":
        block = lm.blocks()[1]
        x = block.norm(lm.resid(tokens, [0])[0])
        gate = (x @ block.mixer.in_proj.weight.T)[..., 64:]
        torch.testing.assert_close(neurons[1][..., 64:], torch.nn.functional.silu(gate), rtol=1e-5, atol=1e-5)
    else:
        mlp = lm.blocks()[0].mlp
        h = lm.blocks()[0].post_attention_layernorm(lm.body().embed_in(tokens))  # parallel residual: MLP reads the input
        torch.testing.assert_close(neurons[0], mlp.act(mlp.dense_h_to_4h(h)), rtol=1e-5, atol=1e-5)
