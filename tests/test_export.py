"""univ's SAEs in SAELens' layout: the files always; SAELens loading them when it is installed."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from univ.export import export
from univ.sae import SAE, SAEConfig

from test_cli import assert_one_line_error, run


def _sae(tmp_path, arch, normalisation):
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=64, k=8 if arch == "topk" else None, l1=5.0 if arch == "relu" else None,
                    normalisation=normalisation, store={"config": {"layer": 3, "hook": "resid_post.3", "model_name": "m"}})
    sae = SAE(cfg)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.normal_(0, 0.3)
        sae.data_scale.fill_(2.5)
    sae.save(tmp_path / f"{arch}-{normalisation}")
    return tmp_path / f"{arch}-{normalisation}"


CASES = [("relu", "token"), ("topk", "dataset"), ("relu", "none")]


@pytest.mark.parametrize("arch, normalisation", CASES)
def test_export_writes_saelens_files(tmp_path, arch, normalisation):
    [out] = export(_sae(tmp_path, arch, normalisation), "saelens", tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(out / "sae_weights.safetensors")
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}[arch] and (cfg["d_in"], cfg["d_sae"]) == (16, 64)
    assert cfg["normalize_activations"] == ("constant_norm_rescale" if normalisation == "token" else "none")
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,)}


@pytest.mark.parametrize("arch, normalisation", CASES)
def test_saelens_loads_the_export_and_computes_the_same(tmp_path, arch, normalisation):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install -e '.[export]')")
    src = _sae(tmp_path, arch, normalisation)
    [out] = export(src, "saelens", tmp_path / "out")
    theirs = sae_lens.SAE.load_from_disk(out)
    ours = SAE.load(src)
    x = torch.randn(200, 16) * 4 + 1
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert torch.allclose(f_theirs, f_ours, atol=1e-5)
        assert torch.allclose(theirs(x), ours.reconstruct(x), atol=1e-4)
        raw = ours.features(x, "raw")
        scale = x.norm(dim=-1, keepdim=True) / math.sqrt(16) if normalisation == "token" else 2.5
        assert torch.allclose(f_theirs * scale, raw, atol=1e-4)


def test_export_cli_and_its_errors(tmp_path, capsys):
    src = _sae(tmp_path / "saes" / "layer", "relu", "token")
    code, out, err = run(capsys, "export-sae", tmp_path / "saes", tmp_path / "out", "--format", "json")
    assert code == 0, err
    [row] = json.loads(out)["export-sae"]
    assert (tmp_path / "out" / src.relative_to(tmp_path / "saes") / "cfg.json").is_file() and row["written"]
    assert_one_line_error(*run(capsys, "export-sae", tmp_path / "empty", tmp_path / "o"), "holds no SAE")
    assert_one_line_error(*run(capsys, "export-sae", tmp_path / "saes", tmp_path / "o", "--to", "onnx"), "unknown format")
