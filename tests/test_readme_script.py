"""The README's step-by-step shell script, run as written on tiny local models: each step must be a
cache hit on what the steps before it made."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import build_neox

ROOT = Path(__file__).resolve().parents[1]


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    [script] = [block for block in re.findall(r"```bash\n(.*?)```", text, re.S) if block.startswith("#!/usr/bin/env bash")]
    return script


def _set(script: str, name: str, value: str) -> str:
    """Give a variable of the script another value (the tiny models and sizes)."""
    pattern = rf"^{name}=.*$"
    assert re.search(pattern, script, re.M), f"the README's script no longer sets {name}"
    return re.sub(pattern, lambda _: f"{name}={value}", script, count=1, flags=re.M)


def _files(cache: Path) -> dict[Path, int]:
    return {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def _sae_dirs(cache: Path) -> dict[tuple[str, str], int]:
    """(model key, hook) -> how many SAE recipes were trained for it."""
    out: dict[tuple[str, str], int] = {}
    for cfg in cache.glob("saes/*/*/*/cfg.json"):
        key = (cfg.parts[-4], cfg.parts[-3])
        out[key] = out.get(key, 0) + 1
    return out


def test_readme_script_reuses_every_step(assets, tmp_path):
    neox = build_neox(tmp_path / "neox", assets["tokenizer"], max_positions=160)  # off-by-one's 129 tokens fit
    script = readme_script()
    assert re.search(r"^A=\S+ B=\S+$", script, re.M), "the README's script no longer sets A and B on one line"
    script = _set(script, "A", f"{neox} B={assets['mamba']}")
    script = _set(script, "CORPUS", '"--tokens 2000 --ctx-len 24"')
    script = _set(script, "SAES", '"--sae-train-tokens 4096 --expansion 2 --l1 5 --sae-batch-size 128 --sae-eval-tokens 1000"')
    lines = script.splitlines()
    # Run it one command at a time (a command may continue over lines) to look at the cache between.
    head = [line for line in lines if line.startswith(("#!", "set ", "export ", "A=", "CORPUS=", "SAES="))]
    commands, current = [], ""
    for line in lines[len(head):]:
        current += line.rstrip("\\") + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    assert [c.split()[1] for c in commands] == ["cache", "fit-sae", "fit-sae", "match", "induction", "induction",
                                                 "offbyone"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "UNIV_DATASET": str(assets["big_corpus"])}
    cache = tmp_path / "univ-cache"
    seen: dict[Path, int] = {}
    for i, command in enumerate(commands):
        done = subprocess.run(["bash", "-c", "\n".join([*head, command])], cwd=tmp_path, env=env, capture_output=True,
                              text=True)
        if command.split()[1] == "offbyone":  # tiny random models: no component stands out to follow
            assert done.returncode == 1 and "lowers p(B) beyond its 95 % interval" in done.stderr, done.stderr
        else:
            assert done.returncode == 0, (command, done.stderr)
        now = _files(cache)
        changed = [p for p, t in seen.items() if now.get(p) != t]
        assert not changed, f"step {i + 1} ({command}) rewrote what an earlier step made: {changed[:5]}"
        new = set(now) - set(seen)
        step = command.split()[1]
        if i > 0:  # the window's token store and activation stores are made once, by `univ cache`
            again = [p for p in new if p.parts[0] == "acts" and "random" not in p.parts[1]
                     and any(part.startswith("resid_post") for part in p.parts)]
            assert not again, f"step {i + 1} ({command}) cached activations again: {again[:3]}"
        if step == "match":  # the SAEs fit-sae made are used; only the seed + 1 skyline's are new for A
            counts = _sae_dirs(cache)
            expected = {k: 2 if k[0].startswith("neox") else 1 for k in counts if "random" not in k[0]}
            assert {k: counts[k] for k in expected} == expected and len(expected) == 2 + 3, counts
        if step in ("induction", "offbyone"):
            assert all(p.parts[0] == "circuits" for p in new), sorted(new)[:5]
        if step == "offbyone":
            assert not new, f"offbyone did not find the induction runs: {sorted(new)}"
        seen = now
    # The MPPC window, the SAEs' held-out rows and the neurons' window (--neuron-tokens): one each.
    assert len(list(cache.glob("tokens/*"))) == 3
    summary = pd.read_csv(tmp_path / "match.csv")
    assert {"comparison", "direction", "mean", "median"} <= set(summary.columns) and len(summary) >= 4
