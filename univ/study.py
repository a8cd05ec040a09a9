"""`univ all`: the whole study in one command, stage by stage, each resumable.

cache → fit-sae (every model) → match (with the preset's reference points) → induction and
offbyone (both models) → report. A stage that fails is named together with the command that
reruns it alone; a rerun of `univ all` skips everything already in the cache.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import __version__, files, models
from .cache import CacheConfig, run_cache
from .errors import UnivError
from .fit import FitConfig, run_fit
from .circuit import CircuitConfig
from .induction import induction_path, run_induction
from .match import MatchConfig
from .match_stage import MatchRequest, run_match
from .offbyone import TABLE, offbyone_path, run_offbyone
from .report import RUNS, write_report
from .store import config_key

PRESETS: dict[str, dict] = {
    # CPU, minutes: a taste of every stage.
    "smoke": dict(tokens=20_000, ctx_len=128, arch="topk", expansion=4, k=16, l1=5.0, sae_batch_size=512,
                  sae_train_tokens=50_000, sae_eval_tokens=10_000, neuron_tokens=5_000, n_seqs=16, state_seqs=None, offbyone_seqs=16,
                  offbyone_len=129, dtype="auto", store_dtype="auto",
                  baselines=["random-init"], skylines=["sae-seed"], neurons=True),
    # One GPU, well under an hour.
    "quick": dict(tokens=200_000, ctx_len=1024, arch="relu", expansion=8, k=32, l1=5.0, sae_batch_size=4096,
                  sae_train_tokens=20_000_000, sae_eval_tokens=65_536, neuron_tokens=50_000, n_seqs=1024, state_seqs=None, offbyone_seqs=128,
                  offbyone_len=129, dtype="auto", store_dtype="auto",
                  baselines=["random-init"], skylines=["sae-seed"], neurons=True),
    # The study's sizes: 1024-token contexts, SAEs (32x, ReLU + L1) on every layer trained on 100M
    # streamed tokens each (after the window's documents), MPPC over 1M tokens, every reference point (model-seed when --model-c is given), neurons over 100K;
    # models run in fp32, activations stored in bf16; the authors' circuit sizes: 65,536 sequences
    # (2,048 for Mamba's state->logit), Off-by-One 128 x 129.
    "paper": dict(tokens=1_000_000, ctx_len=1024, arch="relu", expansion=32, k=32, l1=5.0, sae_batch_size=4096,
                  sae_train_tokens=100_000_000, sae_eval_tokens=65_536, neuron_tokens=100_000, n_seqs=65_536, state_seqs=2_048, offbyone_seqs=128,
                  offbyone_len=129, dtype="fp32", store_dtype="bf16",
                  baselines=["random-init"], skylines=["sae-seed", "model-seed"], neurons=True),
}


@dataclass
class StudyConfig:
    """Options of `univ all`; ``overrides`` holds the preset values given as flags."""

    model_a: str
    model_b: str
    model_c: str | None = None
    preset: str = "quick"
    overrides: dict = field(default_factory=dict)
    dataset: str = "Skylion007/openwebtext"
    feature_scale: str = "raw"
    """What MPPC correlates (see MatchConfig.feature_scale)."""
    centre: str = "layernorm"
    """Which residual streams are stored centred (see CacheConfig.centre)."""
    cpu_scan: str = "eager"
    """Mamba's scan on the CPU (see CacheConfig.cpu_scan)."""
    device: str = "auto"
    cache_dir: Path = Path("univ-cache")
    out: Path | None = None
    """Report folder (default: <cache_dir>/report)."""

    def settings(self) -> dict:
        if self.preset not in PRESETS:
            raise UnivError(f"unknown preset {self.preset!r} (use {', '.join(PRESETS)})")
        s = {**PRESETS[self.preset], **{k: v for k, v in self.overrides.items() if v is not None}}
        # --model-c exists for the model-seed skyline: given, it is run under every preset.
        others = [x for x in s["skylines"] if x != "model-seed"]
        s["skylines"] = others + ["model-seed"] if self.model_c else others
        return s


class StudyResult(NamedTuple):
    summary: list[dict]
    run_file: Path
    report: dict


@contextmanager
def _stage(name: str, rerun: str, seconds: dict | None = None):
    """Run a stage; a failure names it and the command that reruns it alone. ``seconds`` adds the
    stage's wall time under its name (stages that run per model add up)."""
    start = time.monotonic()
    try:
        yield
    except UnivError as e:
        raise UnivError(f"stage {name} failed: {e} — rerun it alone with: {rerun}") from None
    if seconds is not None:
        seconds[name] = round(seconds.get(name, 0.0) + time.monotonic() - start, 2)


def _in_cache(path, cache_dir: Path) -> str:
    """A path relative to the cache root, as run.json keeps them (the report finds them from any
    working directory, and a cache can be moved whole)."""
    return os.path.relpath(path, cache_dir)


def _cmd(*parts) -> str:
    return "univ " + " ".join(shlex.quote(str(p)) for p in parts if p is not None and p != "")


def run_all(cfg: StudyConfig, progress: bool = True) -> StudyResult:
    s = cfg.settings()
    a, b = cfg.model_a, cfg.model_b
    data = CacheConfig(models=[], dataset=cfg.dataset, tokens=s["tokens"], ctx_len=s["ctx_len"], dtype=s["dtype"],
                       store_dtype=s["store_dtype"], centre=cfg.centre, cpu_scan=cfg.cpu_scan,
                       device=cfg.device, cache_dir=cfg.cache_dir)
    fit = FitConfig(arch=s["arch"], expansion=s["expansion"], l1=s["l1"], k=s["k"], batch_size=s["sae_batch_size"],
                    train_tokens=s["sae_train_tokens"], eval_tokens=s["sae_eval_tokens"], device=cfg.device)
    corpus = ["--dataset", cfg.dataset, "--tokens", s["tokens"], "--ctx-len", s["ctx_len"], "--dtype", s["dtype"],
              "--centre", cfg.centre, "--cpu-scan", cfg.cpu_scan, "--device", cfg.device, "--cache-dir", cfg.cache_dir]
    common = [*corpus, "--store-dtype", s["store_dtype"]]
    sae_flags = ["--arch", s["arch"], "--expansion", s["expansion"], "--l1", s["l1"], "--k", s["k"]]
    sae_budget = [s["sae_train_tokens"], s["sae_batch_size"], s["sae_eval_tokens"]]
    everyone = [a, b] + ([cfg.model_c] if "model-seed" in s["skylines"] else [])
    durations: dict[str, float] = {}
    with _stage("cache", _cmd("cache", *[x for m in everyone for x in ("--model", m)], *common), durations):
        random_b = [models.RANDOM_PREFIX + b] if "random-init" in s["baselines"] else []
        run_cache(dataclasses.replace(data, models=everyone + random_b), progress)
    quality = []
    for model in everyone:
        with _stage("fit-sae", _cmd("fit-sae", "--model", model, *sae_flags, "--train-tokens", sae_budget[0],
                                    "--batch-size", sae_budget[1], "--eval-tokens", sae_budget[2], *corpus), durations):
            for r in run_fit(fit, "all", cfg.cache_dir, cache_cfg=dataclasses.replace(data, models=[model]),
                             progress=progress):
                quality.append({"model": model, **{k: v for k, v in r._asdict().items() if k != "path"}})
    req = MatchRequest(model_a=a, model_b=b, model_c=cfg.model_c, baselines=s["baselines"], skylines=s["skylines"],
                       neurons=s["neurons"], neuron_tokens=s["neuron_tokens"], data=data, fit=fit,
                       match=MatchConfig(tokens=s["tokens"], feature_scale=cfg.feature_scale, device=cfg.device),
                       cache_dir=cfg.cache_dir)
    match_flags = [*[x for v in s["baselines"] for x in ("--baseline", v)], *[x for v in s["skylines"] for x in ("--skyline", v)],
                   "--neurons" if s["neurons"] else "", "--model-c" if cfg.model_c else "", cfg.model_c or "",
                   "--feature-scale", cfg.feature_scale]
    with _stage("match", _cmd("match", "--model-a", a, "--model-b", b, *match_flags, *sae_flags, "--sae-train-tokens",
                              sae_budget[0], "--sae-batch-size", sae_budget[1], "--sae-eval-tokens", sae_budget[2],
                              "--neuron-tokens", s["neuron_tokens"],
                              *common), durations):
        comparisons = run_match(req, progress)
    circuit = CircuitConfig(n_seqs=s["n_seqs"], state_seqs=s["state_seqs"], device=cfg.device)
    obo_cfg = dataclasses.replace(circuit, n_seqs=s["offbyone_seqs"], state_seqs=None, seq_len=s["offbyone_len"])
    induction, offbyone, paths = [], [], {"induction": [], "offbyone": []}
    for model in (a, b):
        where = ["--device", cfg.device, "--cache-dir", cfg.cache_dir]
        flags = ["--model", model, "--n-seqs", s["n_seqs"], *(["--state-seqs", s["state_seqs"]] if s["state_seqs"] else []),
                 *where]
        obo_flags = ["--model", model, "--n-seqs", s["offbyone_seqs"], "--seq-len", s["offbyone_len"], *where]
        lm = models.load(model, device=cfg.device, dtype=circuit.dtype)
        with _stage("induction", _cmd("induction", *flags), durations):
            induction.append(run_induction(lm, circuit, cfg.cache_dir, progress=progress))
        with _stage("offbyone", _cmd("offbyone", *obo_flags), durations):
            offbyone.append(run_offbyone(lm, obo_cfg, cfg.cache_dir, induction=circuit, progress=progress))
        paths["induction"].append(_in_cache(induction_path(cfg.cache_dir, lm, circuit), cfg.cache_dir))
        paths["offbyone"].append(_in_cache(offbyone_path(cfg.cache_dir, lm, obo_cfg, induction=circuit), cfg.cache_dir))
    run = {"model_a": a, "model_b": b, "model_c": cfg.model_c, "preset": cfg.preset, "settings": s,
           "feature_scale": cfg.feature_scale, "centre": cfg.centre, "cpu_scan": cfg.cpu_scan,
           "dataset": cfg.dataset, "device": cfg.device, "univ_version": __version__,
           "sae_quality": quality, "match": [_in_cache(c.path, cfg.cache_dir) for c in comparisons], "circuits": paths,
           "seconds": durations}
    key = config_key({k: run[k] for k in ("model_a", "model_b", "model_c", "preset", "settings", "dataset",
                                          "feature_scale", "centre", "cpu_scan")})
    run_file = cfg.cache_dir / RUNS / key / "run.json"
    files.write_json(run_file, run)
    with _stage("report", _cmd("report", "--cache-dir", cfg.cache_dir, "--run", run_file)):
        report = write_report(run_file, cfg.out or cfg.cache_dir / "report")
    return StudyResult(summary(quality, comparisons, induction, offbyone), run_file, report)


def summary(quality, comparisons, induction, offbyone) -> list[dict]:
    """One concise table: SAE quality, MPPC per comparison, top induction component, off-by-one
    shift. Each row's numbers are also in its 'values' (for --format json)."""
    rows = []
    for model in dict.fromkeys(q["model"] for q in quality):
        qs = [q for q in quality if q["model"] == model]
        lr = [q["loss_recovered"] for q in qs if q["loss_recovered"] is not None]
        mean = {key: sum(q[key] for q in qs) / len(qs) for key in ("l0", "explained_variance", "dead_fraction")}
        loss = sum(lr) / len(lr) if lr else None
        rows.append({"what": "SAE quality", "subject": model,
                     "result": f"{len(qs)} layers, d_sae {qs[0]['d_sae']}, mean L0 {mean['l0']:.1f}, "
                               f"explained variance {mean['explained_variance']:.3f}, dead {mean['dead_fraction']:.3f}"
                               + (f", loss recovered {loss:.3f}" if lr else ""),
                     "values": {"layers": len(qs), "d_sae": qs[0]["d_sae"], "mean_l0": mean["l0"],
                                "mean_explained_variance": mean["explained_variance"],
                                "mean_dead_fraction": mean["dead_fraction"], "mean_loss_recovered": loss}})
    for c in comparisons:
        for row in c.summary(False):
            rows.append({"what": f"MPPC {row['comparison']}", "subject": row["direction"],
                         "result": f"alive {row['alive']}/{row['features']}, mean {row['mean']:.3f}, "
                                   f"median {row['median']:.3f}, >=0.7 {row['>=0.7']:.3f}",
                         "values": {k: v for k, v in row.items() if k not in ("comparison", "direction")}})
    for r in induction:
        table = "state->logit" if r.family == "mamba" else "head->logit"
        top = r.rows[table][0]
        rows.append({"what": f"induction ({table})", "subject": r.model,
                     "result": f"{top['component']}: p(B) {r.clean[table]['p_B']:.4f} -> {top['p_B']:.4f}",
                     "values": {"component": top["component"], "clean_p_B": r.clean[table]["p_B"],
                                "patched_p_B": top["p_B"]}})
    for r in offbyone:
        entries = r.rows[TABLE]
        top = max(entries, key=lambda e: abs(e["delta_logit_B"]))
        rows.append({"what": "off-by-one", "subject": r.model,
                     "result": f"{r.config['component']}: largest change at p = {top['position']} "
                               f"(d logit(B) {top['delta_logit_B']:+.3f}; B sits at 1)",
                     "values": {"component": r.config["component"], "position": top["position"],
                                "delta_logit_B": top["delta_logit_B"]}})
    return rows
