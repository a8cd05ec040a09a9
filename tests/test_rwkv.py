"""RWKV-4: univ's WKV against transformers' and a direct recurrence; the family's hooks."""

import os

import pytest
import torch

from conftest import build_rwkv
from univ import models, wkv


def _inputs(B=2, T=37, C=8, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(B, T, C, generator=g) * scale,
            torch.randn(B, T, C, generator=g))


def _direct(time_decay, time_first, k, v, S=None, D=None):
    """The recurrence with the true sums, in float64 (no max trick): small inputs only."""
    w, u = -torch.exp(time_decay.double()), time_first.double()
    k, v = k.double(), v.double()
    S = torch.zeros_like(k[:, 0]) if S is None else S
    D = torch.zeros_like(k[:, 0]) if D is None else D
    out, states = [], []
    for t in range(k.shape[1]):
        e = torch.exp(u + k[:, t])
        out.append((S + e * v[:, t]) / (D + e))
        S = torch.exp(w) * S + torch.exp(k[:, t]) * v[:, t]
        D = torch.exp(w) * D + torch.exp(k[:, t])
        states.append((S, D))
    return torch.stack(out, 1), states


def test_wkv_equals_transformers_and_a_direct_recurrence():
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    td, tf, k, v = _inputs()
    ours, last, every = wkv.wkv_torch(td, tf, k, v, states=True)
    theirs, state = rwkv_linear_attention_cpu(td, tf, k, v, return_state=True)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(last, state):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    direct, states = _direct(td, tf, k, v)
    assert torch.allclose(ours.double(), direct, atol=1e-5)
    for t in (0, 5, 36):  # the state after every position, in RWKV's (num, den, max) form
        S, D = states[t]
        mx = every.max[:, t].double()
        assert torch.allclose(every.num[:, t].double() * torch.exp(mx), S, rtol=1e-5, atol=1e-6)
        assert torch.allclose(every.den[:, t].double() * torch.exp(mx), D, rtol=1e-5)


def test_wkv_carries_a_state_and_survives_large_exponents():
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    td, tf, k, v = _inputs(T=64, scale=30.0)  # keys up to ~100: the sums overflow float32 without the max trick
    td = td + 2  # fast decays, |w| up to ~50: exponents in the thousands over 64 positions
    _, first = wkv.wkv_torch(td, tf, k[:, :20], v[:, :20])[:2]
    rest, last = wkv.wkv_torch(td, tf, k[:, 20:], v[:, 20:], state=first)[:2]
    whole, whole_last = wkv.wkv_torch(td, tf, k, v)[:2]
    assert torch.isfinite(whole).all()
    assert torch.allclose(rest, whole[:, 20:], atol=1e-5, rtol=1e-5)
    theirs, _ = rwkv_linear_attention_cpu(td, tf, k[:, 20:], v[:, 20:], state=[x.clone() for x in first])
    assert torch.allclose(rest, theirs, atol=1e-4, rtol=1e-4)
    assert torch.allclose(last.max, whole_last.max) and torch.allclose(last.den, whole_last.den, rtol=1e-5)


@pytest.mark.skipif(not wkv.HAVE_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="needs Triton (on CUDA, or its interpreter)")
def test_triton_wkv_equals_the_torch_form():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    td, tf, k, v = (x.to(device) for x in _inputs(T=9, C=40))
    ours, last, every = wkv.wkv_torch(td, tf, k, v, states=True)
    tri, tlast, tevery = wkv.wkv_triton(td, tf, k, v, states=True, block=32)
    assert torch.allclose(tri, ours, atol=1e-5, rtol=1e-5)
    for a, b in zip(tevery, every):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    rest, rlast, _ = wkv.wkv_triton(td, tf, k, v, state=last, block=32)
    expected, elast, _ = wkv.wkv_torch(td, tf, k, v, state=last)
    assert torch.allclose(rest, expected, atol=1e-5, rtol=1e-5) and torch.allclose(rlast.max, elast.max)


@pytest.fixture(scope="module")
def rwkv(assets, tmp_path_factory):
    return build_rwkv(tmp_path_factory.mktemp("rwkv") / "tiny-rwkv", assets["tokenizer"])


def test_rwkv_family_hooks_and_forward(rwkv, assets):
    from transformers.models.rwkv import modeling_rwkv

    lm = models.load(str(rwkv), device="cpu")
    assert lm.family == "rwkv" and lm.n_layers == 3 and lm.source.max_ctx is None
    tokens = torch.randint(3, 300, (2, 20))
    resid = lm.resid(tokens, [0, 1, 2])
    with torch.no_grad():  # transformers' own loop over positions
        out = lm.model(input_ids=tokens, output_hidden_states=True, use_cache=False)
    assert modeling_rwkv.rwkv_linear_attention.__name__ == "rwkv_linear_attention"  # restored after univ's forwards
    # resid_post.l is transformers' hidden_states[l] (block outputs, halved after every 2nd block here).
    for layer in range(3):
        assert torch.allclose(resid[layer], out.hidden_states[layer], atol=1e-5, rtol=1e-4), layer
    assert torch.allclose(lm.logits(tokens), out.logits, atol=1e-4, rtol=1e-4)
    # A replacement of resid_post.1 (halved) reaches the logits as given.
    doubled = lm.logits(tokens, replace={1: lambda x: 2 * x})
    keep = lm.logits(tokens, replace={1: lambda x: x})
    assert torch.allclose(keep, out.logits, atol=1e-4, rtol=1e-4) and not torch.allclose(doubled, keep)
    neurons = lm.neurons(tokens, [0, 2])
    assert neurons.shape == (2, 2, 20, 128) and (neurons >= 0).all()


def test_rwkv_cache_shares_a_token_store_with_gpt_neox(rwkv, assets, tmp_path):
    from univ.cache import CacheConfig, run_cache

    result = run_cache(CacheConfig(models=[str(assets["neox"]), str(rwkv)], dataset=str(assets["corpus"]), tokens=500,
                                   ctx_len=24, cache_dir=tmp_path), progress=False)
    assert [m.rows for m in result.models] == [500, 500] and result.models[1].d_model == 32


def test_univ_all_on_three_architectures(rwkv, assets, tmp_path, capsys, monkeypatch):
    """GPT-NeoX, Mamba and RWKV in one run: every pair matched both ways, a matrix with A's
    random-init baseline per architecture, a depth map per pair, the circuits of all three."""
    import json

    from test_cli import run

    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "all", "--model-a", assets["neox"], "--model-b", assets["mamba"], "--model-b", rwkv,
                         "--preset", "smoke", "--dataset", assets["big_corpus"], "--tokens", "2000", "--ctx-len", "24",
                         "--expansion", "2", "--k", "4", "--sae-batch-size", "128", "--sae-train-tokens", "4096",
                         "--sae-eval-tokens", "1000", "--neuron-tokens", "1000", "--n-seqs", "8", "--offbyone-len", "24",
                         "--device", "cpu", "--format", "json")
    assert code == 0, err
    tables = json.loads(out)
    grid = {(r["from"], r["to"]): r for r in tables["matrix"]}
    assert set(grid) == {(x, y) for x in ("A", "B", "B2") for y in ("A", "B", "B2") if x != y}
    for (x, y), r in grid.items():
        assert -1 <= r["median"] <= 1 and (r["random-init mean"] is not None) == (x == "A"), (x, y)
    rows = tables["summary"]
    whats = [r["what"] for r in rows]
    assert whats.count("SAE quality") == 3
    assert all(whats.count(f"MPPC {name}") == 2 for name in ("main", "A-B2", "B-B2", "random-init", "random-init B2"))
    assert whats.count("induction (state->logit)") == 2 and whats.count("induction (head->logit)") == 1
    # Random tiny models: no component stands out, so no off-by-one for any of them.
    assert [r["subject"] for r in rows if r["what"] == "off-by-one"] == [str(assets["neox"]), str(assets["mamba"]), str(rwkv)]
    figures = [p.split("/")[-1] for p in tables["run"][0]["figures"]]
    assert {"depth_map.png", "depth_map_A-B2.png", "depth_map_B-B2.png"} <= set(figures)
    report_md = open(tables["run"][0]["report"]).read()
    assert "B2 = tiny-rwkv" in report_md and "## MPPC between every pair of models" in report_md


def test_rwkv_last_position_rerun_matches_transformers_state_api(rwkv):
    """The last position re-run from a trace: unpatched, it is the model's own output; with one
    layer's WKV state replaced (total effect), it is what transformers computes when that state is
    handed to it for the last token."""
    from univ import rwkv as rw

    lm = models.load(str(rwkv), device="cpu")
    g = torch.Generator().manual_seed(1)
    tokens, other = torch.randint(3, 300, (3, 12), generator=g), torch.randint(3, 300, (3, 12), generator=g)
    clean, corrupted = rw.trace(lm, tokens), rw.trace(lm, other)
    for layer in range(lm.n_layers):
        assert torch.allclose(rw.last_position(lm, clean, layer), clean.logits, atol=1e-4)
    layer = 1
    theirs = []
    with torch.no_grad():  # one sequence at a time: transformers 5.24's stateful RWKV is wrong for batch > 1
        for row in range(len(tokens)):
            state = lm.model(input_ids=tokens[row:row + 1, :-1], use_cache=True).state
            for i, part in enumerate(corrupted.state[layer]):
                state[2 + i][:, :, layer] = part[row]
            theirs.append(lm.model(input_ids=tokens[row:row + 1, -1:], state=state, use_cache=True).logits[0, -1])
    theirs = torch.stack(theirs)
    ours = rw.last_position(lm, clean, layer, state=corrupted.state[layer])
    assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(ours, clean.logits, atol=1e-3)
    # At the last layer nothing is above it to freeze: direct and total agree.
    top = lm.n_layers - 1
    assert torch.allclose(rw.last_position(lm, clean, top, state=corrupted.state[top], freeze="wkv"),
                          rw.last_position(lm, clean, top, state=corrupted.state[top]), atol=1e-6)


def test_rwkv_induction_and_offbyone_tables(rwkv, tmp_path, capsys):
    import json

    from test_cli import run

    common = ["--n-seqs", "12", "--seq-len", "16", "--device", "cpu", "--cache-dir", tmp_path, "--format", "json"]
    code, out, err = run(capsys, "induction", "-m", rwkv, *common)
    assert code == 0, err
    tables = json.loads(out)
    assert sorted(r["component"] for r in tables["state->logit"]) == ["layer 0", "layer 1", "layer 2"]
    assert len(tables["time-mix->logit"]) == 3 and len(tables["shift->state->logit"]) == 2 * 4
    assert {r["analysis"] for r in tables["clean"]} == {"state->logit", "time-mix->logit", "shift->state->logit"}
    code, out, err = run(capsys, "offbyone", "-m", rwkv, "--layer", "1", *common[:-2], "--seq-len", "20", "--format", "json")
    assert code == 0, err
    table = json.loads(out)["off-by-one (B at position 1)"]
    assert [row["position"] for row in table] == [1, 2, 3, 4]


def planted_rwkv(path, tokenizer, shift_only: bool):
    """Layer 0 writes nothing into the stream (its time-mix output is zero) and its channel mix
    reads only the current token, so layer 1's input at p depends on token p alone. Layer 1's keys
    and values read only the token-shifted input (``shift_only``) or only the current one: B (at
    position 1) then enters layer 1's state with the write at p = 2, or at p = 1."""
    from transformers import RwkvForCausalLM

    build_rwkv(path, tokenizer, rescale_every=0)
    model = RwkvForCausalLM.from_pretrained(path)
    with torch.no_grad():
        b0, b1 = model.rwkv.blocks[0], model.rwkv.blocks[1]
        b0.attention.output.weight.zero_()
        b0.feed_forward.time_mix_key.fill_(1.0)
        b0.feed_forward.time_mix_receptance.fill_(1.0)
        for p in (b1.attention.time_mix_key, b1.attention.time_mix_value):
            p.fill_(0.0 if shift_only else 1.0)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("shift_only, expected", [(True, 2), (False, 1)])
def test_planted_rwkv_offbyone(assets, tmp_path, shift_only, expected):
    from univ.circuit import CircuitConfig
    from univ.offbyone import TABLE, run_offbyone

    path = planted_rwkv(tmp_path / "planted", assets["tokenizer"], shift_only)
    r = run_offbyone(models.load(str(path), device="cpu"), CircuitConfig(n_seqs=24, seq_len=20, batch=12, device="cpu"),
                     tmp_path, layer="1")
    deltas = {row["position"]: abs(row["delta_logit_B"]) for row in r.rows[TABLE]}
    assert deltas[expected] > 1e-4, deltas
    assert all(d < 1e-6 for p, d in deltas.items() if p != expected), deltas


def test_real_config_rwkv_equals_transformers(tmp_path):
    """RWKV-169M's architecture (univ's shipped config), random weights: univ's forward (its WKV)
    gives transformers' logits and hidden states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from univ.architectures import CONFIGS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIGS["rwkv-169m"])).eval()
    tokens = torch.randint(0, 50_000, (2, 16))
    with torch.no_grad():
        theirs = model(input_ids=tokens, output_hidden_states=True, use_cache=False)
        with wkv.in_transformers():
            ours = model(input_ids=tokens, output_hidden_states=True, use_cache=False)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-3, rtol=1e-4)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
