"""Path patching on models whose answer is known by construction.

Planted Mamba: three layers, of which only the middle one writes to the residual stream
(the others' out_proj is zero), and whose causal conv passes on the previous position only.
So B's information (B at position 1) enters that layer's state at position 2 and nowhere else.
Planted GPT-NeoX: two layers, of which only head L1H2 writes to the residual stream; its keys
and values at a position depend on that position's token alone, so B enters at position 1.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import build_mamba, build_neox
from univ import models, patching
from univ.circuit import CircuitConfig, CircuitResult, NothingToFollow, followed
from univ.induction import induction_data, run_induction
from univ.offbyone import run_offbyone

from test_cli import assert_one_line_error, run

CFG = dict(n_seqs=24, seq_len=24, batch=12, device="cpu")


@pytest.fixture(scope="module")
def planted(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    mamba_dir = build_mamba(root / "mamba", assets["tokenizer"], seed=3)
    lm = models.load(str(mamba_dir), device="cpu")
    with torch.no_grad():
        for i, block in enumerate(lm.blocks()):
            if i != 1:
                block.mixer.out_proj.weight.zero_()
        conv = lm.blocks()[1].mixer.conv1d
        conv.weight.zero_()
        conv.weight[:, 0, -2] = 1.0  # output at t = input at t - 1
        conv.bias.zero_()
        lm.blocks()[1].mixer.A_log.fill_(-2.0)  # slow decay: the state keeps B over the sequence
    lm.model.save_pretrained(root / "mamba")
    neox_dir = build_neox(root / "neox", assets["tokenizer"], seed=3)
    lm = models.load(str(neox_dir), device="cpu")
    with torch.no_grad():
        dh = 32 // 4
        for i, block in enumerate(lm.blocks()):
            keep = torch.zeros(32, dtype=torch.bool)
            if i == 1:
                keep[2 * dh:3 * dh] = True
            block.attention.dense.weight[:, ~keep] = 0
    lm.model.save_pretrained(root / "neox")
    return {"mamba": str(root / "mamba"), "neox": str(root / "neox")}


def test_mamba_last_position_step_reproduces_the_forward(planted):
    lm = models.load(planted["mamba"], device="cpu")
    tokens = torch.randint(3, 300, (4, 17))
    run_ = patching.mamba_trace(lm.model, tokens, [15, 16])
    with torch.no_grad():
        full = lm.model(input_ids=tokens).logits[:, -1]
    torch.testing.assert_close(run_.logits, full, rtol=1e-4, atol=1e-4)
    for layer in range(3):
        tr = run_.traces[layer]
        for freeze in (None, "state", "y"):
            own = patching.last_position(lm.model, run_, layer, state_prev=tr.states[:, 0],
                                         y_ssm=patching.readout(tr, 16), freeze=freeze)
            torch.testing.assert_close(own, run_.logits, rtol=1e-4, atol=1e-4)
        decay, write = patching.writes(lm.blocks()[layer].mixer, tr)
        torch.testing.assert_close(patching.rebuilt_last_state(decay, write), tr.states[:, 1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def _reference(model, tokens, read_last=None, xc_edit=None):
    """Logits at the last position from a whole-sequence forward in which layer i's SSM read-out
    at the last position is ``read_last[i](trace)`` and its SSM input is ``xc_edit[i](xc)``: the
    authors' hooks (hook_h / hook_y at the last position, hook_conv), written out."""
    from univ.mamba import MixerTrace, residual_of, ssm_forward
    from univ.scan import causal_conv_silu

    read_last, xc_edit = read_last or {}, xc_edit or {}
    T = tokens.shape[1]
    hidden = model.backbone.embeddings(tokens)
    for i, block in enumerate(model.backbone.layers):
        mixer = block.mixer
        E = mixer.intermediate_size
        xz = F.linear(block.norm(hidden), mixer.in_proj.weight)
        x, z = xz[..., :E], xz[..., E:]
        xc = causal_conv_silu(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias)
        xc = xc_edit[i](xc) if i in xc_edit else xc
        tr = MixerTrace()
        y = ssm_forward(mixer, xc, z, tr, [T - 2, T - 1])
        if i in read_last:
            y = y.clone()
            y[:, -1] = (read_last[i](tr) + mixer.D * xc[:, -1]) * F.silu(z[:, -1])
        hidden = residual_of(block, hidden) + F.linear(y, mixer.out_proj.weight)
    return model.lm_head(model.backbone.norm_f(hidden[:, -1]))


def _frozen_h(clean_trace, T):
    return lambda tr: (patching.state_at(clean_trace, T - 1) * tr.C[:, -1, None, :]).sum(-1)


@pytest.mark.parametrize("effect", ["direct", "total"])
def test_mamba_state_and_y_patches_equal_the_authors_whole_sequence_hooks(assets, effect):
    """state->logit: the patched layer's last state = Ā_{T−1} h_{T−2}(no B) + B̄_{T−1}x_{T−1};
    y->logit: its read-out C·h from the run without the repeated A. 'direct' freezes every other
    layer's last state (resp. read-out) to clean, as the authors' state_to_logit.py / y_to_logit.py."""
    lm = models.load(str(assets["mamba"]), device="cpu")
    model = lm.model
    cfg = CircuitConfig(n_seqs=6, seq_len=20, device="cpu")
    data = induction_data(lm, cfg)
    T = cfg.seq_len
    clean = patching.mamba_trace(model, data["clean"], [T - 2, T - 1])
    no_b = patching.mamba_trace(model, data["no_b"], [T - 2])
    no_a = patching.mamba_trace(model, data["no_a"], [T - 1])
    for layer in range(3):
        h_prev = patching.state_at(no_b.traces[layer], T - 2)
        mixer = lm.blocks()[layer].mixer

        def patched_state(tr, h_prev=h_prev, mixer=mixer):
            decay, write = patching.writes(mixer, tr)
            return ((decay[:, -1] * h_prev + write[:, -1]) * tr.C[:, -1, None, :]).sum(-1)

        others = {i: _frozen_h(clean.traces[i], T) for i in range(3) if i != layer} if effect == "direct" else {}
        got = patching.last_position(model, clean, layer, state_prev=h_prev,
                                     freeze="state" if effect == "direct" else None)
        torch.testing.assert_close(got, _reference(model, data["clean"], {**others, layer: patched_state}),
                                   rtol=1e-4, atol=1e-4)
        others = {i: (lambda tr, i=i: patching.readout(clean.traces[i], T - 1)) for i in range(3) if i != layer} \
            if effect == "direct" else {}
        got = patching.last_position(model, clean, layer, y_ssm=patching.readout(no_a.traces[layer], T - 1),
                                     freeze="y" if effect == "direct" else None)
        expected = _reference(model, data["clean"], {**others, layer: lambda tr: patching.readout(no_a.traces[layer], T - 1)})
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert (got - clean.logits).abs().max() > 1e-5  # a real change: the comparison is not vacuous


def test_conv_cumulative_reproduces_the_authors_script(assets, tmp_path):
    """conv_to_state_to_logit.py, transliterated: its swaps write into the cached conv input, so
    they accumulate; the layer is re-run over the whole sequence, the layers above keep their
    clean last states. Without --conv-cumulative each swap stands alone."""
    lm = models.load(str(assets["mamba"]), device="cpu")
    model = lm.model
    cfg = CircuitConfig(n_seqs=8, seq_len=20, batch=8, device="cpu", conv_layers="1", conv_cumulative=True)
    T, layer = cfg.seq_len, 1
    data = induction_data(lm, cfg)
    clean = patching.mamba_trace(model, data["clean"], [T - 2, T - 1])
    corrupted = patching.mamba_trace(model, data["no_ab"], [])
    mixer = lm.blocks()[layer].mixer
    rows, s = torch.arange(8), data["s"]
    frozen = {i: _frozen_h(clean.traces[i], T) for i in range(layer + 1, 3)}
    expected = {}
    for bias in (1, 2):
        x_in = clean.traces[layer].x.clone()  # the authors' cache, mutated by every swap
        for channel in range(bias + 1):
            x_in[rows, s + bias - channel] = corrupted.traces[layer].x[rows, s + bias - channel]
            from univ.scan import causal_conv_silu
            conv = causal_conv_silu(x_in, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias)

            def edit(xc, conv=conv, bias=bias):
                xc = xc.clone()
                xc[rows, s + bias] = conv[rows, s + bias]
                return xc

            logits = _reference(model, data["clean"], frozen, {layer: edit})
            p = torch.softmax(logits, -1)[rows, data["b"]].mean().item()
            expected[f"layer 1: conv out at s+{bias}, inputs at s+{bias - channel}..s+{bias}"
                     if channel else f"layer 1: conv out at s+{bias}, input at s+{bias}"] = p
    r = run_induction(lm, cfg, tmp_path)
    got = {row["component"]: row["p_B"] for row in r.rows["conv->state->logit"]}
    assert got.keys() == expected.keys()
    for name, p in expected.items():
        assert got[name] == pytest.approx(p, rel=1e-5, abs=1e-9), name
    single = run_induction(lm, dataclasses.replace(cfg, conv_cumulative=False), tmp_path)
    names = [row["component"] for row in single.rows["conv->state->logit"]]
    assert sorted(names) == sorted(f"layer 1: conv out at s+{o}, input at s+{i}" for o in (1, 2) for i in range(o + 1))


def test_neox_direct_head_patch_freezes_every_other_head_and_recomputes_the_mlps(assets, tmp_path):
    """head->logit, direct (the authors' head_to_logit.py): the residual at the last position
    after layer l−1, then per layer: attention output at the last position = the clean heads'
    (one head from the random run at layer l), MLP recomputed; nothing else changes."""
    lm = models.load(str(assets["neox"]), device="cpu")
    assert lm.model.config.use_parallel_residual
    cfg = CircuitConfig(n_seqs=8, seq_len=16, batch=8, device="cpu", head="1.0")
    data = induction_data(lm, cfg)
    T, L, H = cfg.seq_len, lm.n_layers, 4
    last = torch.full((8,), T - 1)
    with torch.no_grad():
        with patching.neox_heads(lm, capture={i: last for i in range(L)}) as z_clean:
            out = lm.model(input_ids=data["clean"], output_hidden_states=True)
        with patching.neox_heads(lm, capture={i: last for i in range(L)}) as z_rand:
            lm.logits(data["random"])
    r = run_induction(lm, cfg, tmp_path)
    got = {row["component"]: row["p_B"] for row in r.rows["head->logit"]}
    for layer in range(L):
        for head in range(H):
            with torch.no_grad():
                h = out.hidden_states[layer][:, -1]
                for i in range(layer, L):
                    block = lm.blocks()[i]
                    z = z_clean[i].clone()
                    if i == layer:
                        z[:, head] = z_rand[i][:, head]
                    attn = block.attention.dense(z.reshape(8, -1))
                    h = h + attn + block.mlp(block.post_attention_layernorm(h))
                logits = lm.model.get_output_embeddings()(lm.model.gpt_neox.final_layer_norm(h))
            p = torch.softmax(logits, -1)[torch.arange(8), data["b"]].mean().item()
            assert got[f"L{layer}H{head}"] == pytest.approx(p, rel=1e-5), (layer, head)
    total = run_induction(lm, dataclasses.replace(cfg, effect="total"), tmp_path)
    assert {row["component"]: row["p_B"] for row in total.rows["head->logit"]} != got


def _effects(result, table):
    """|change of B's mean logit| per component: p(B) moves little in a random model."""
    return {r["component"]: abs(r["logit_B"] - result.clean_logit) for r in result.rows[table]}


def test_mamba_induction_finds_the_planted_layer(planted, tmp_path):
    lm = models.load(planted["mamba"], device="cpu")
    r = run_induction(lm, CircuitConfig(**CFG), tmp_path)
    effects = _effects(r, "state->logit")
    assert effects["layer 1"] > 1e-4
    # Layers that write nothing have no drop and no interval; the random model does not solve the task.
    stands = {row["component"]: row["stands_out"] for row in r.rows["state->logit"]}
    assert not stands["layer 0"] and not stands["layer 2"]
    clean = r.clean["state->logit"]
    assert not clean["solved"] and clean["p_B_ci"] > 0 and clean["chance"] > 0
    assert effects["layer 0"] < 1e-6 and effects["layer 2"] < 1e-6
    # y->logit patches the read-out C·h, before the D skip and the gate. The planted conv hears
    # only t-1, so layer 1's read-out at the last position cannot see the last token (A): the
    # run without the repeated A reads out the same, and no layer moves p(B). (Patching the gated
    # output, as univ once did, moved it through the gate, which does see A.)
    assert max(_effects(r, "y->logit").values()) < 1e-6
    conv = _effects(r, "conv->state->logit")
    # The conv passes on t-1 only: the output at s+2 hears input s+1, the output at s+1 input s.
    assert conv["layer 1: conv out at s+2, input at s+1"] > 1e-5
    assert conv["layer 1: conv out at s+1, input at s+0"] > 1e-5
    for name, effect in conv.items():
        if name.startswith("layer 1") and name not in ("layer 1: conv out at s+2, input at s+1",
                                                        "layer 1: conv out at s+1, input at s+0"):
            assert effect < 1e-7, name


def test_offbyone_shift_in_mamba_and_none_in_gpt_neox(planted, tmp_path):
    # The planted components move B's logit but barely p(B) (random weights), so they are named.
    mamba = run_offbyone(models.load(planted["mamba"], device="cpu"), CircuitConfig(**CFG), tmp_path, layer="1")
    neox = run_offbyone(models.load(planted["neox"], device="cpu"), CircuitConfig(**CFG, head="1.2"), tmp_path)
    for result, expected in ((mamba, 2), (neox, 1)):
        deltas = {r["position"]: abs(r["delta_logit_B"]) for r in result.rows["write at position p corrupted"]}
        assert deltas[expected] > 1e-4, deltas
        assert all(d < 1e-6 for p, d in deltas.items() if p != expected), deltas
    assert mamba.config["component"] == "layer 1"
    assert neox.config["component"] == "L1H2 keys and values"


def test_offbyone_follows_only_a_component_that_stands_out(planted, tmp_path, capsys):
    # On the planted Mamba no layer lowers p(B) beyond its interval: nothing is followed.
    with pytest.raises(NothingToFollow, match="give --layer"):
        run_offbyone(models.load(planted["mamba"], device="cpu"), CircuitConfig(**CFG), tmp_path)
    assert_one_line_error(*run(capsys, "offbyone", "-m", planted["mamba"], "--n-seqs", "24", "--device", "cpu",
                               "--cache-dir", tmp_path), "lowers p(B) beyond its 95 % interval")

    def row(component, drop, stands_out):
        return {"component": component, "drop": drop, "drop_ci": 0.01, "stands_out": stands_out}

    result = CircuitResult("induction", "gpt_neox", "m", {}, 0.5, 1.0, rows={"head->logit": [
        row("L0H1", 0.4, True),     # layer 0: cannot be an induction head
        row("L2H0", -0.3, True),    # raises p(B)
        row("L3H1", 0.2, False),    # within its interval
        row("L1H3", 0.1, True),
        row("L4H2", 0.05, True),
    ]})
    assert followed(result, "head->logit") == "L1H3"


def test_k_composition_into_a_head_that_does_not_stand_out_is_flagged(planted, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="univ"):
        r = run_induction(models.load(planted["neox"], device="cpu"), CircuitConfig(**CFG), tmp_path)
    assert not any(row["stands_out"] for row in r.rows["head->logit"])
    assert "K-composition is computed into L" in caplog.text and "which is noise" in caplog.text


def test_neox_induction_finds_the_planted_head(planted, tmp_path):
    lm = models.load(planted["neox"], device="cpu")
    r = run_induction(lm, CircuitConfig(**CFG, head="1.2"), tmp_path)
    effects = _effects(r, "head->logit")
    assert max(effects, key=effects.get) == "L1H2"
    assert all(e < 1e-6 for name, e in effects.items() if name != "L1H2")
    [comp_table] = [t for t in r.rows if t.startswith("head->L1H2")]
    assert len(r.rows[comp_table]) == 4  # the four layer-0 heads
    patched = patching.neox_heads
    with patched(lm, capture={0: torch.full((2,), 5)}) as z:
        lm.logits(torch.randint(3, 300, (2, 8)))
    assert z[0].shape == (2, 4, 8)


def test_circuit_clis_side_by_side_and_cached(planted, tmp_path, capsys):
    common = ["--n-seqs", "12", "--seq-len", "16", "--device", "cpu", "--cache-dir", tmp_path, "--format", "json"]
    code, out, err = run(capsys, "offbyone", "-m", planted["neox"], "-m", planted["mamba"], "--layer", "1",
                         "--head", "1.2", *common)
    assert code == 0, err
    table = json.loads(out)["off-by-one (B at position 1)"]
    assert [row["position"] for row in table] == [1, 2, 3, 4]
    mamba_col = [k for k in table[0] if "mamba" in k and "d_logit_B" in k][0]
    assert max(table, key=lambda row: abs(row[mamba_col]))["position"] == 2
    code, out, err = run(capsys, "induction", "-m", planted["mamba"], *common)
    assert code == 0 and json.loads(out)["state->logit"][0]["component"] in ("layer 0", "layer 1", "layer 2")
    assert run(capsys, "induction", "-m", planted["mamba"], *common)[1] == out  # a cache hit


def test_circuit_bad_inputs(planted, tmp_path, capsys):
    base = ["--device", "cpu", "--cache-dir", tmp_path]
    cases = [
        (["induction", "-m", planted["mamba"], "--head", "1.2", *base], "GPT-NeoX option"),
        (["induction", "-m", planted["neox"], "--conv-layers", "1", *base], "not GPT-NeoX options"),
        (["induction", "-m", planted["mamba"], "--conv-layers", "9", *base], "out of range"),
        (["induction", "-m", planted["mamba"], "--effect", "partial", *base], "unknown --effect"),
        (["offbyone", "-m", planted["neox"], "--swap-decay", *base], "Mamba option"),
        (["induction", "-m", planted["neox"], "--head", "L5H0", *base], "out of range"),
        (["induction", "-m", planted["neox"], "--head", "five", *base], "must look like"),
        (["offbyone", "-m", planted["neox"], "--layer", "1", *base], "Mamba and RWKV option"),
        (["induction", "-m", planted["mamba"], "--seq-len", "3", *base], "--seq-len must be at least 4"),
        (["offbyone", "-m", planted["mamba"], "--layer", "7", *base], "out of range"),
        (["induction", "-m", planted["neox"], "--head", "5.0", *base], "out of range"),
    ]
    for args, fragment in cases:
        assert_one_line_error(*run(capsys, *args), fragment)


@pytest.mark.parametrize("swap_decay", [False, True])
def test_offbyone_equals_the_authors_notebook(assets, tmp_path, swap_decay):
    """pos_to_state_to_logit.ipynb, transliterated: layer ℓ's last state unrolled with the write at
    p from the corrupted run (and, as the notebook did, the decay from its position p + 1), every
    other layer's last state frozen clean."""
    from univ.offbyone import TABLE, offbyone_data

    lm = models.load(str(assets["mamba"]), device="cpu")
    model, layer = lm.model, 1
    cfg = CircuitConfig(n_seqs=6, seq_len=20, batch=6, device="cpu", swap_decay=swap_decay)
    T = cfg.seq_len
    data = offbyone_data(lm, cfg)
    clean = patching.mamba_trace(model, data["clean"], [T - 2, T - 1])
    corrupted = patching.mamba_trace(model, data["corrupted"], [])
    mixer = lm.blocks()[layer].mixer
    decay, write = patching.writes(mixer, clean.traces[layer])
    decay_c, write_c = patching.writes(mixer, corrupted.traces[layer])
    frozen = {i: _frozen_h(clean.traces[i], T) for i in range(3) if i != layer}
    base = _reference(model, data["clean"])[torch.arange(6), data["b"]].mean().item()
    r = run_offbyone(lm, cfg, tmp_path, layer=str(layer))
    for row in r.rows[TABLE]:
        p = row["position"]
        h = torch.zeros_like(write[:, 0])
        for t in range(T):
            h = h * (decay_c[:, t + 1] if swap_decay and t == p else decay[:, t]) + (write_c if t == p else write)[:, t]
        logits = _reference(model, data["clean"], {**frozen, layer: lambda tr, h=h: (h * tr.C[:, -1, None, :]).sum(-1)})
        assert row["delta_logit_B"] == pytest.approx(logits[torch.arange(6), data["b"]].mean().item() - base,
                                                     rel=1e-4, abs=1e-5), p


def test_neox_k_composition_equals_the_authors_script(assets, tmp_path):
    """head_to_head_to_logit.py, transliterated with hooks of its own: an earlier head's output at
    s+1 from the random run, every other head at s+1 frozen clean; the induction head's output at
    the last position from that run spliced into the clean run, every other head there frozen.
    Four layers and the induction head in layer 2, so that both freezes matter."""
    lm = models.load(str(build_neox(tmp_path / "neox4", assets["tokenizer"], layers=4, seed=4)), device="cpu")
    cfg = CircuitConfig(n_seqs=8, seq_len=16, batch=8, device="cpu", head="L2H0")
    data = induction_data(lm, cfg)
    rows, s1, last, dh, ind = torch.arange(8), data["s"] + 1, cfg.seq_len - 1, 8, 2

    @torch.no_grad()
    def run_with(tokens, edits):
        """Logits at the last position; edits[layer](z) returns the attention.dense input to use."""
        seen = {}

        def hook(layer, fn):
            def pre(module, args):
                seen[layer] = args[0].clone()
                return (fn(args[0].clone()), *args[1:])
            return pre

        handles = [lm.blocks()[i].attention.dense.register_forward_pre_hook(hook(i, edits.get(i, lambda z: z)))
                   for i in range(lm.n_layers)]
        try:
            return lm.model(input_ids=tokens).logits[:, -1], seen
        finally:
            for h in handles:
                h.remove()

    _, z_clean = run_with(data["clean"], {})
    _, z_rand = run_with(data["random"], {})
    expected = {}
    for layer in range(ind):
        for head in range(4):
            def at_s1(i, layer=layer, head=head):
                def edit(z):
                    z[rows, s1] = z_clean[i][rows, s1]
                    if i == layer:
                        z[rows, s1, head * dh:(head + 1) * dh] = z_rand[i][rows, s1, head * dh:(head + 1) * dh]
                    return z
                return edit

            _, z_mid = run_with(data["clean"], {i: at_s1(i) for i in range(ind)})

            def at_last(i, z_mid=z_mid):
                def edit(z):
                    z[:, last] = z_clean[i][:, last]
                    if i == ind:
                        z[:, last, :dh] = z_mid[ind][:, last, :dh]
                    return z
                return edit

            logits, _ = run_with(data["clean"], {i: at_last(i) for i in range(lm.n_layers)})
            expected[f"L{layer}H{head}"] = torch.softmax(logits, -1)[rows, data["b"]].mean().item()
    table = "head->L2H0 (K-composition)"
    got = {row["component"]: row["p_B"] for row in run_induction(lm, cfg, tmp_path).rows[table]}
    assert got.keys() == expected.keys()
    for name, p in expected.items():
        assert got[name] == pytest.approx(p, rel=1e-5), name
    total = run_induction(lm, dataclasses.replace(cfg, effect="total"), tmp_path).rows[table]
    assert max(abs(got[row["component"]] - row["p_B"]) for row in total) > 1e-7  # the freezes matter here


def test_a_component_stands_out_when_its_paired_drop_leaves_zero_out_of_its_interval():
    """Means: the drop's 95 % interval is paired over sequences (clean and patched p(B) on the
    same ones); a consistent drop stands out, a drop that changes sign from sequence to sequence
    does not, and the clean run is 'solved' only when its interval sits above chance."""
    from univ.circuit import Means

    g = torch.Generator().manual_seed(0)
    target = torch.zeros(400, dtype=torch.long)
    clean_logits = torch.randn(400, 10, generator=g)
    clean_logits[:, 0] += 3.0  # B well above chance (1/10)
    means = Means()
    ref = means.add("clean", clean_logits, target)
    consistent = clean_logits.clone()
    consistent[:, 0] -= 1.0
    means.add("consistent", consistent, target, ref)
    noisy = clean_logits.clone()
    noisy[:, 0] += torch.where(torch.arange(400) % 2 == 0, 1.0, -1.0) * torch.rand(400, generator=g)
    means.add("noisy", noisy, target, ref)
    rows = {r["component"]: r for r in means.rows(["consistent", "noisy"], means.get("clean")[0], str)}
    assert rows["consistent"]["stands_out"] and rows["consistent"]["drop"] > rows["consistent"]["drop_ci"] > 0
    assert not rows["noisy"]["stands_out"]
    clean = means.clean("clean", chance=0.1)
    assert clean["solved"] and clean["p_B"] - clean["p_B_ci"] > 0.1
    assert not means.clean("clean", chance=0.99)["solved"]
