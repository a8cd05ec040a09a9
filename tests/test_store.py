import json

import pytest
import torch

from univ.errors import UnivError
from univ.store import FORMAT_VERSION, CorruptChunk, Store, config_key


def test_config_key_is_stable_and_sensitive():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_chunks_round_trip_and_are_hashed(tmp_path):
    s = Store.open_or_create(tmp_path / "s", "acts", {"x": 1})
    acts = torch.randn(5, 3)
    s.write_chunk(0, {"acts": acts}, rows=5)
    s.set_complete(True)
    again = Store.read(tmp_path / "s")
    assert again.complete and again.rows == 5
    torch.testing.assert_close(again.read_chunk(0)["acts"], acts)
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_a_damaged_chunk_is_never_read(tmp_path):
    s = Store.open_or_create(tmp_path / "s", "acts", {"x": 1})
    s.write_chunk(0, {"acts": torch.zeros(4, 2)}, rows=4)
    s.write_chunk(1, {"acts": torch.ones(4, 2)}, rows=4)
    s.set_complete(True)
    path = tmp_path / "s" / "chunk-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptChunk, match="chunk-000001"):
        s.read_chunk(1)
    assert s.verify() == [0]
    assert not Store.read(tmp_path / "s").complete
    (tmp_path / "s" / "chunk-000000.safetensors").write_bytes(b"short")
    with pytest.raises(CorruptChunk):
        s.read_chunk(0)


def test_newer_or_broken_manifest_is_a_clear_error(tmp_path):
    s = Store.open_or_create(tmp_path / "s", "acts", {"x": 1})
    manifest = json.loads((s.path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (s.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnivError, match="upgrade univ"):
        Store.read(s.path)
    (s.path / "manifest.json").write_text("{not json")
    with pytest.raises(UnivError, match="corrupt"):
        Store.read(s.path)


def test_verify_rehashes_a_chunk_that_changed_since_it_was_checked(tmp_path):
    s = Store.open_or_create(tmp_path / "s", "acts", {"x": 1})
    s.write_chunk(0, {"acts": torch.zeros(4, 2)}, rows=4)
    assert s.verify() == [0]
    assert s.verify() == [0]  # remembered
    path = tmp_path / "s" / "chunk-000000.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    assert s.verify() == []
