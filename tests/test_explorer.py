"""The report's explorer page, opened from disk in a real browser (Debian's chromium, headless): no
error, and the planted pair of features shows up as partners, with its contexts as text."""

import html as html_lib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from univ import files
from univ.cache import CacheConfig, run_cache
from univ.match import MatchConfig, Side, compare
from univ.report import write_report
from univ.store import Store

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _planted_run(assets, tmp_path) -> Path:
    """A's features: the tiny GPT-NeoX's layer-0 residual stream (32 dims); B's: 16 random features
    of which #3 is 2 x A's #5 + 1. A run.json naming the comparison, as `univ all` writes it."""
    cache = tmp_path / "cache"
    result = run_cache(CacheConfig(models=[str(assets["neox"])], dataset=str(assets["corpus"]), tokens=1500, ctx_len=24,
                                   layers="0", cache_dir=cache), progress=False)
    a_store = Store.read(Path(result.models[0].store) / "resid_post.0")
    x = torch.cat([a_store.read_chunk(i)["acts"] for i in sorted(a_store.chunks)])
    g = torch.Generator().manual_seed(0)
    y = torch.randn(len(x), 16, generator=g)
    y[:, 3] = 2 * x[:, 5] + 1
    b_store = Store.open_or_create(tmp_path / "planted-b", "acts", {"layer": 0, "tokens_store": a_store.config["tokens_store"]})
    rows = [a_store.chunks[i]["rows"] for i in sorted(a_store.chunks)]
    start = 0
    for i, n in enumerate(rows):
        b_store.write_chunk(i, {"acts": y[start:start + n]}, rows=n)
        start += n
    b_store.set_complete(True)
    a = Side("A", {0: a_store}, {0: None}, {"acts": "a"})
    b = Side("B", {0: b_store}, {0: None}, {"acts": "b"})
    c = compare("main", a, b, MatchConfig(device="cpu"), cache / "match", progress=False)
    run_file = cache / "runs" / "planted" / "run.json"
    files.write_json(run_file, {"model_a": str(assets["neox"]), "model_b": "planted", "preset": "test",
                                "match": [str(Path(c.path).relative_to(cache))], "circuits": {}})
    return run_file


def test_explorer_page_in_a_real_browser(assets, tmp_path):
    if BROWSER is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    written = write_report(_planted_run(assets, tmp_path), tmp_path / "report")
    page = Path(written["page"])
    url = page.as_uri() + "#cmp=main&layer=0&feature=5"
    flags = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
             "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-ready="1"' in html, "the page did not finish loading the layer"
    errors = re.search(r"<pre id=\"errors\">(.*?)</pre>", html, re.S).group(1)
    assert errors.strip() == "", errors
    assert "Uncaught" not in dom.stderr
    # The planted pair: A's #5 is listed with B's layer 0 #3 as its partner, r = 1.
    row = re.search(r'<tr data-feature="5" data-partner="([^"]+)">(.*?)</tr>', html, re.S)
    assert row is not None and row.group(1) == "L0 #3"
    assert "<td>1.000</td>" in row.group(2)
    # Its contexts are text from the tokenizer, with the maximum marked.
    assert 'class="tok max"' in row.group(2)
    # Each context is a stretch of one document: its decoded tokens, joined, are found in one.
    contexts = re.findall(r'<div class="ctx">(.*?)</div>', row.group(2), re.S)
    assert len(contexts) == 2 * 3
    for ctx in contexts:
        text = html_lib.unescape("".join(re.findall(r'<span class="tok[^"]*"[^>]*>([^<]*)</span>', ctx)))
        assert len(text) > 5 and any(text in doc for doc in assets["docs"]), text
    shot = tmp_path / "explorer.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = json.loads(re.search(r"const INDEX=(.*?);\n", page.read_text()).group(1))
    assert [c["name"] for c in index] == ["main"] and index[0]["layers"] == [{"layer": 0, "file": "main-a0"}]
