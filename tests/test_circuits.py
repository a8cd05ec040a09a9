"""Path patching on models whose answer is known by construction.

Planted Mamba: three layers, of which only the middle one writes to the residual stream
(the others' out_proj is zero), and whose causal conv passes on the previous position only.
So B's information (B at position 1) enters that layer's state at position 2 and nowhere else.
Planted GPT-NeoX: two layers, of which only head L1H2 writes to the residual stream; its keys
and values at a position depend on that position's token alone, so B enters at position 1.
"""

import json

import pytest
import torch

from conftest import build_mamba, build_neox
from univ import models, patching
from univ.induction import CircuitConfig, run_induction
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
        torch.testing.assert_close(patching.last_position(lm.model, run_, layer), run_.logits, rtol=1e-4, atol=1e-4)
        own = patching.last_position(lm.model, run_, layer, state_prev=tr.states[:, 0], y_last=tr.y[:, -1])
        torch.testing.assert_close(own, run_.logits, rtol=1e-4, atol=1e-4)
        decay, write = patching.writes(lm.blocks()[layer].mixer, tr)
        torch.testing.assert_close(patching.rebuilt_last_state(decay, write), tr.states[:, 1], rtol=1e-4, atol=1e-5)


def _effects(result, table):
    """|change of B's mean logit| per component: p(B) moves little in a random model."""
    return {r["component"]: abs(r["logit_B"] - result.clean_logit) for r in result.rows[table]}


def test_mamba_induction_finds_the_planted_layer(planted, tmp_path):
    lm = models.load(planted["mamba"], device="cpu")
    r = run_induction(lm, CircuitConfig(**CFG), tmp_path)
    for table in ("state->logit", "y->logit"):
        effects = _effects(r, table)
        assert effects["layer 1"] > 1e-4, table
        assert effects["layer 0"] < 1e-6 and effects["layer 2"] < 1e-6, table
        assert max(effects, key=effects.get) == "layer 1"
    conv = _effects(r, "conv->state->logit")
    # The conv passes on t-1 only: the output at s+2 hears input s+1, the output at s+1 input s.
    assert conv["layer 1: conv out at s+2, input at s+1"] > 1e-5
    assert conv["layer 1: conv out at s+1, input at s+0"] > 1e-5
    for name, effect in conv.items():
        if name.startswith("layer 1") and name not in ("layer 1: conv out at s+2, input at s+1",
                                                        "layer 1: conv out at s+1, input at s+0"):
            assert effect < 1e-7, name


def test_offbyone_shift_in_mamba_and_none_in_gpt_neox(planted, tmp_path):
    mamba = run_offbyone(models.load(planted["mamba"], device="cpu"), CircuitConfig(**CFG), tmp_path)
    neox = run_offbyone(models.load(planted["neox"], device="cpu"), CircuitConfig(**CFG), tmp_path)
    for result, expected in ((mamba, 2), (neox, 1)):
        deltas = {r["position"]: abs(r["delta_logit_B"]) for r in result.rows["write at position p corrupted"]}
        assert deltas[expected] > 1e-4, deltas
        assert all(d < 1e-6 for p, d in deltas.items() if p != expected), deltas
    assert mamba.config["component"] == "layer 1"
    assert neox.config["component"] == "L1H2 keys and values"


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
    code, out, err = run(capsys, "offbyone", "-m", planted["neox"], "-m", planted["mamba"], *common)
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
        (["induction", "-m", planted["neox"], "--top-layers", "2", *base], "Mamba option"),
        (["offbyone", "-m", planted["neox"], "--layer", "1", *base], "Mamba option"),
        (["induction", "-m", planted["mamba"], "--seq-len", "3", *base], "--seq-len must be at least 4"),
        (["offbyone", "-m", planted["mamba"], "--layer", "7", *base], "out of range"),
        (["induction", "-m", planted["neox"], "--head", "5.0", *base], "out of range"),
    ]
    for args, fragment in cases:
        assert_one_line_error(*run(capsys, *args), fragment)
