"""Malformed inputs a user can give: each ends in one `univ: error:` line naming what is wrong."""

import json
import os
import pickle
import shutil

import pytest

from test_cli import assert_one_line_error, run


class _Boom:
    """A pickle that would run a command when loaded: univ must never load it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def bad(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (root / "number.jsonl").write_text('{"text": "fine"}\n{"text": 123}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "ints.parquet")
    no_layers = shutil.copytree(assets["neox"], root / "no-layers")
    config = json.loads((no_layers / "config.json").read_text())
    del config["num_hidden_layers"]
    (no_layers / "config.json").write_text(json.dumps(config))
    truncated = shutil.copytree(assets["neox"], root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    flipped = shutil.copytree(assets["neox"], root / "flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[10] ^= 0xFF  # inside the JSON header
    (flipped / "model.safetensors").write_bytes(bytes(data))
    malicious = shutil.copytree(assets["neox"], root / "malicious")
    (malicious / "model.safetensors").unlink()
    (malicious / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Boom()}))
    garbage = root / "garbage-mamba-ssm"
    garbage.mkdir()
    (garbage / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 300}))
    (garbage / "pytorch_model.bin").write_bytes(b"not a checkpoint\nat all\n")
    for f in assets["mamba"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, garbage / f.name)
    return root


def _cache(assets, tmp_path, *extra, model=None, dataset=None):
    return ["cache", "-m", model or assets["neox"], "--dataset", dataset or assets["corpus"], "--tokens", "300",
            "--ctx-len", "24", "--cache-dir", tmp_path / "cache", *extra]


def _fit(assets, tmp_path, *extra):
    return ["fit-sae", "-m", assets["neox"], "--dataset", assets["big_corpus"], "--tokens", "500", "--ctx-len", "24",
            "--sae-train-tokens", "1024", "--sae-batch-size", "128", "--sae-eval-tokens", "300", "--cache-dir", tmp_path / "c", *extra]


CASES = {
    "device mps": (lambda a, b, t: _cache(a, t, "--device", "mps"), "mps"),
    "device meta": (lambda a, b, t: _cache(a, t, "--device", "meta"), "meta"),
    "latin-1 jsonl": (lambda a, b, t: _cache(a, t, dataset=b / "latin1.jsonl"), "not UTF-8"),
    "a number in jsonl": (lambda a, b, t: _cache(a, t, dataset=b / "number.jsonl"), "number.jsonl:2"),
    "an int parquet column": (lambda a, b, t: _cache(a, t, dataset=b / "ints.parquet"), "not text"),
    "no num_hidden_layers": (lambda a, b, t: _cache(a, t, model=b / "no-layers"), "number of layers"),
    "truncated safetensors": (lambda a, b, t: _cache(a, t, model=b / "truncated"), "cannot load model"),
    "header-flipped safetensors": (lambda a, b, t: _cache(a, t, model=b / "flipped"), "cannot load model"),
    "a malicious pickle": (lambda a, b, t: _cache(a, t, model=b / "malicious"), "cannot load model"),
    "a garbage mamba-ssm checkpoint": (lambda a, b, t: _cache(a, t, model=b / "garbage-mamba-ssm"), "cannot read"),
    "expansion 1e7": (lambda a, b, t: _fit(a, t, "--expansion", "1e7"), "GiB"),
    "expansion nan": (lambda a, b, t: _fit(a, t, "--expansion", "nan"), "--expansion"),
    "lr -1": (lambda a, b, t: _fit(a, t, "--lr", "-1"), "--lr"),
    "lr nan": (lambda a, b, t: _fit(a, t, "--lr", "nan"), "--lr"),
    "seed 2**64": (lambda a, b, t: _fit(a, t, "--sae-seed", str(2**64)), "--sae-seed"),
    "induction batch 0": (lambda a, b, t: ["induction", "-m", a["neox"], "--batch-seqs", "0", "--device", "cpu",
                                           "--cache-dir", t], "--batch-seqs"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_input_ends_in_one_line(assets, bad, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args, fragment = CASES[case]
    assert_one_line_error(*run(capsys, *args(assets, bad, tmp_path)), fragment)
    assert not (tmp_path / "PWNED").exists()
    assert not list((tmp_path / "cache").glob("tokens/*"))  # the model is checked before any tokenizing


def test_a_full_disk_names_the_file(assets, tmp_path, capsys, monkeypatch):
    import errno

    from univ import files

    real = os.fdopen

    def full(fd, mode="r", *a, **k):
        f = real(fd, mode, *a, **k)
        if "w" in mode:
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(files.os, "fdopen", full)
    code, out, err = run(capsys, *_cache(assets, tmp_path))
    assert_one_line_error(code, out, err, "No space left on device: ")
    assert str(tmp_path / "cache") in err


def test_a_corpus_that_is_not_utf8_is_read_with_one_warning(assets, tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(("\n\n".join(assets["docs"]) + "\n\ncaf\xe9 au lait\n").encode("latin-1"))
    code, out, err = run(capsys, *_cache(assets, tmp_path, dataset=corpus))
    assert code == 0, err
    assert err.count("is not valid UTF-8") == 1


def test_a_model_folder_without_its_tokenizer_is_named(assets, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(assets["neox"] / name, folder / name)
    assert_one_line_error(*run(capsys, *_cache(assets, tmp_path, model=folder)), "has no tokenizer")


def test_a_known_model_out_of_reach_blames_the_hub_not_the_name(tmp_path, capsys, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("EleutherAI/pythia-160m", "config.json"), str):
        pytest.skip("pythia-160m is in this machine's Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "cache", "-m", "pythia-160m", "--tokens", "100", "--cache-dir", tmp_path)
    assert_one_line_error(code, out, err, "the Hub could not be reached")
    assert "check the name" not in err
    code, out, err = run(capsys, "cache", "-m", "someone/no-such-model", "--tokens", "100", "--cache-dir", tmp_path)
    assert_one_line_error(code, out, err, "check the name")
