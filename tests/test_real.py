"""The study's circuit results on the real checkpoints. Opt-in: `python -m pytest -m real`;
skipped when the weights are not in the local Hugging Face cache (HF_HUB_OFFLINE=1)."""

import pytest

from univ import models
from univ.errors import UnivError
from univ.circuit import CircuitConfig
from univ.induction import run_induction
from univ.offbyone import run_offbyone

pytestmark = pytest.mark.real


def _load(name):
    try:
        return models.load(name, dtype="fp32")
    except UnivError as e:
        pytest.skip(f"{name} is not available offline: {e}")


def test_pythia_160m_induction_head_is_L5H0(tmp_path):
    r = run_induction(_load("pythia-160m"), CircuitConfig(), tmp_path)
    assert 0.008 < r.clean_p < 0.035  # the study: 0.0170
    assert r.rows["head->logit"][0]["component"] == "L5H0"  # the study: 0.0170 -> 0.0025


def test_mamba_130m_layer_17_stores_the_association_one_position_late(tmp_path):
    lm = _load("mamba-130m")
    r = run_induction(lm, CircuitConfig(), tmp_path)
    assert r.rows["state->logit"][0]["component"] == "layer 17"  # the study: 0.0486 -> 0.0003
    obo = run_offbyone(lm, CircuitConfig(n_seqs=128, seq_len=129), tmp_path, layer="17")
    deltas = {row["position"]: row["delta_logit_B"] for row in obo.rows["write at position p corrupted"]}
    assert min(deltas, key=deltas.get) == 2 and deltas[2] < -3  # the study: -9.13 at p = 2
