"""The study's circuit results on the real checkpoints, with the authors' definitions (univ's
defaults). Opt-in: `python -m pytest -m real`; skipped when the weights are not in the local
Hugging Face cache (HF_HUB_OFFLINE=1). The numbers in comments are the authors' stored results."""

import pytest

from univ import models
from univ.circuit import CircuitConfig
from univ.errors import UnivError
from univ.induction import run_induction
from univ.offbyone import TABLE, run_offbyone

pytestmark = pytest.mark.real


def _load(name):
    try:
        return models.load(name, dtype="fp32")
    except UnivError as e:
        pytest.skip(f"{name} is not available offline: {e}")


def test_pythia_160m_induction_head_is_L5H0_composing_with_L3H2(tmp_path):
    r = run_induction(_load("pythia-160m"), CircuitConfig(n_seqs=1024, head="L5H0"), tmp_path)
    assert 0.008 < r.clean_p < 0.035  # the authors: 0.0170
    assert r.rows["head->logit"][0]["component"] == "L5H0"  # 0.0170 -> 0.0025
    assert r.rows["head->L5H0 (K-composition)"][0]["component"] == "L3H2"  # -> 0.0039


def test_mamba_130m_layer_17_stores_the_association_one_position_late(tmp_path):
    lm = _load("mamba-130m")
    r = run_induction(lm, CircuitConfig(n_seqs=1024, state_seqs=1024, conv_layers="17"), tmp_path)
    assert r.rows["state->logit"][0]["component"] == "layer 17"  # 0.0486 -> 0.0003
    assert r.rows["y->logit"][0]["component"] == "layer 17"  # 0.0528 -> 0.0006
    conv = {row["component"]: row["p_B"] for row in r.rows["conv->state->logit"]}
    assert conv["layer 17: conv out at s+2, input at s+1"] < 0.25 * r.clean_p  # B enters through s+2's conv
    obo = run_offbyone(lm, CircuitConfig(n_seqs=128, seq_len=129, swap_decay=True), tmp_path, layer="17")
    deltas = {row["position"]: row["delta_logit_B"] for row in obo.rows[TABLE]}
    assert min(deltas, key=deltas.get) == 2 and deltas[2] < -3  # -0.01, -9.13, +0.52, +0.16
