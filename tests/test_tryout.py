"""The offline try-out: two local models sharing a tokenizer, built without the Hub."""

from univ import models, tryout


def test_tryout_builds_two_local_models_sharing_a_tokenizer(tmp_path, capsys):
    tryout.main([str(tmp_path / "t")])
    out = capsys.readouterr().out
    a, b = tmp_path / "t" / "pythia-14m-random", tmp_path / "t" / "mamba-14m-random"
    assert f"HF_HUB_OFFLINE=1 univ all --model-a {a} --model-b {b} --dataset {tmp_path / 't' / 'corpus.txt'}" in out
    sources = [models.resolve(str(p)) for p in (a, b)]
    assert [s.family for s in sources] == ["gpt_neox", "mamba"]
    assert [(s.n_layers, s.d_model) for s in sources] == [(6, 128), (6, 128)]
    tokenizers = [models.load_tokenizer(s) for s in sources]
    assert len({models.tokenizer_fingerprint(t) for t in tokenizers}) == 1
    lm = models.load(str(b), device="cpu")
    assert lm.model.config.vocab_size >= len(tokenizers[1]) and lm.model.config.vocab_size % 8 == 0
