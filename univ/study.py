"""`univ all`: the whole study in one command, stage by stage, each resumable.

cache → fit-sae (every model) → match (with the preset's reference points) → induction and
offbyone (both models) → report. A stage that fails is named together with the command that
reruns it alone; a rerun of `univ all` skips everything already in the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import __version__, files, flags, models
from .cache import CacheConfig, run_cache
from .circuit import CircuitConfig, NothingToFollow
from .errors import UnivError
from .fit import FitConfig, run_fit
from .flags import DEFAULT_DATASET
from .induction import induction_path, run_induction
from .match import MatchConfig
from .match_stage import MatchRequest, matrix, run_match
from .offbyone import TABLE, offbyone_path, run_offbyone
from .report import RUNS, write_report
from .store import config_key

log = logging.getLogger("univ")

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
    more_b: list[str] = field(default_factory=list)
    """Further models compared with A and B and with each other (B2, B3, ...)."""
    model_c: str | None = None
    preset: str = "quick"
    overrides: dict = field(default_factory=dict)
    data: CacheConfig = field(default_factory=lambda: CacheConfig(models=[], dataset=DEFAULT_DATASET))
    """The corpus and how activations are computed (device, centring, scan, cache root); the
    preset sets its tokens, ctx_len, dtype and store_dtype."""
    sae_seed: int = FitConfig.seed
    feature_scale: str = "raw"
    """What MPPC correlates (see MatchConfig.feature_scale)."""
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
    skipped: list[dict]
    """Stages not run for a model, and why ({stage, model, why}; also in run.json)."""
    matrix: list[dict]
    """With several B models: MPPC between every ordered pair (match_stage.matrix)."""


@contextmanager
def _stage(name: str, rerun: str, seconds: dict | None = None, what: str = ""):
    """Run a stage, logged at its start and end; a failure names it and the command that reruns it
    alone. ``seconds`` adds the stage's wall time under its name (stages run per model add up)."""
    label = f"{name} ({what})" if what else name
    log.info("stage %s: started", label)
    start = time.monotonic()
    try:
        yield
    except UnivError as e:
        raise UnivError(f"stage {name} failed: {e} — rerun it alone with: {rerun}") from None
    took = time.monotonic() - start
    log.info("stage %s: done in %.1f s", label, took)
    if seconds is not None:
        seconds[name] = round(seconds.get(name, 0.0) + took, 2)


def _in_cache(path, cache_dir: Path) -> str:
    """A path relative to the cache root, as run.json keeps them (the report finds them from any
    working directory, and a cache can be moved whole)."""
    return os.path.relpath(path, cache_dir)


class _Plan(NamedTuple):
    """Every stage's config, as run_all runs it, and the command that reruns each alone."""

    settings: dict
    everyone: list[str]
    """The models given SAEs: A, the B models and (for the model-seed skyline) C."""
    cached: list[str]
    """Every model univ cache caches: those, and the B models' random-init baselines."""
    data: CacheConfig
    fit: FitConfig
    match: MatchRequest
    circuit: CircuitConfig
    offbyone: CircuitConfig
    rerun: dict[str, str]
    """Stage (fit-sae, induction and offbyone per model: 'fit-sae MODEL') -> its command line."""


def plan(cfg: StudyConfig) -> _Plan:
    s = cfg.settings()
    a, b = cfg.model_a, cfg.model_b
    data = dataclasses.replace(cfg.data, models=[], tokens=s["tokens"], ctx_len=s["ctx_len"], dtype=s["dtype"],
                               store_dtype=s["store_dtype"])
    fit = FitConfig(arch=s["arch"], expansion=s["expansion"], l1=s["l1"], k=s["k"], batch_size=s["sae_batch_size"],
                    train_tokens=s["sae_train_tokens"], eval_tokens=s["sae_eval_tokens"], seed=cfg.sae_seed,
                    batch_contexts=data.batch_size, device=data.device)
    bs = [b, *cfg.more_b]
    everyone = [a, *bs] + ([cfg.model_c] if "model-seed" in s["skylines"] else [])
    req = MatchRequest(model_a=a, model_b=b, more_b=cfg.more_b, model_c=cfg.model_c, baselines=s["baselines"], skylines=s["skylines"],
                       neurons=s["neurons"], neuron_tokens=s["neuron_tokens"], data=data, fit=fit,
                       match=MatchConfig(tokens=s["tokens"], feature_scale=cfg.feature_scale, device=data.device),
                       cache_dir=data.cache_dir)
    circuit = CircuitConfig(n_seqs=s["n_seqs"], state_seqs=s["state_seqs"], device=data.device)
    obo = dataclasses.replace(circuit, n_seqs=s["offbyone_seqs"], state_seqs=None, seq_len=s["offbyone_len"])

    where = ["--cache-dir", data.cache_dir]
    corpus = flags.of(data, flags.CORPUS) + where
    sae = flags.of(fit, flags.SAE)
    randoms = [models.RANDOM_PREFIX + m for m in bs] if "random-init" in s["baselines"] else []
    cached = everyone + randoms
    rerun = {"cache": flags.command("cache", *[x for m in cached for x in ("--model", m)], *corpus)}
    for m in everyone:
        rerun[f"fit-sae {m}"] = flags.command("fit-sae", "--model", m, *sae,
                                              *flags.of(data, flags.CORPUS, skip=("store_dtype",)), *where)
    reference = [*[x for v in s["baselines"] for x in ("--baseline", v)], *[x for v in s["skylines"] for x in ("--skyline", v)],
                 *(["--model-c", cfg.model_c] if cfg.model_c else []), *(["--neurons"] if s["neurons"] else []),
                 "--neuron-tokens", s["neuron_tokens"], "--feature-scale", cfg.feature_scale]
    rerun["match"] = flags.command("match", "--model-a", a, *[x for m in bs for x in ("--model-b", m)], *reference, *sae,
                                   *corpus)
    for m in (a, *bs):
        rerun[f"induction {m}"] = flags.command("induction", "--model", m, *flags.of(circuit, flags.CIRCUIT), *where)
        rerun[f"offbyone {m}"] = flags.command(
            "offbyone", "--model", m, *flags.of(obo, flags.CIRCUIT), "--induction-seqs", circuit.n_seqs,
            *(["--induction-state-seqs", circuit.state_seqs] if circuit.state_seqs else []), *where)
    return _Plan(s, everyone, cached, data, fit, req, circuit, obo, rerun)


def run_all(cfg: StudyConfig, progress: bool = True) -> StudyResult:
    a, b = cfg.model_a, cfg.model_b
    p = plan(cfg)
    s, everyone, cache_dir = p.settings, p.everyone, p.data.cache_dir
    durations: dict[str, float] = {}
    with _stage("cache", p.rerun["cache"], durations):
        run_cache(dataclasses.replace(p.data, models=p.cached), progress)
    quality = []
    for model in everyone:
        with _stage("fit-sae", p.rerun[f"fit-sae {model}"], durations, model):
            for r in run_fit(p.fit, "all", cache_dir, cache_cfg=dataclasses.replace(p.data, models=[model]),
                             progress=progress):
                quality.append({"model": model, **{k: v for k, v in r._asdict().items() if k != "path"}})
    with _stage("match", p.rerun["match"], durations):
        comparisons = run_match(p.match, progress)
    induction, offbyone, paths, skipped = [], [], {"induction": [], "offbyone": []}, []
    for model in (a, b, *cfg.more_b):
        lm = models.load(model, device=p.data.device, dtype=p.circuit.dtype)
        with _stage("induction", p.rerun[f"induction {model}"], durations, model):
            induction.append(run_induction(lm, p.circuit, cache_dir, progress=progress))
        paths["induction"].append(_in_cache(induction_path(cache_dir, lm, p.circuit), cache_dir))
        with _stage("offbyone", p.rerun[f"offbyone {model}"], durations, model):
            try:
                offbyone.append(run_offbyone(lm, p.offbyone, cache_dir, induction=p.circuit, progress=progress))
            except NothingToFollow as e:  # a model without an induction circuit: nothing to trace, say so
                skipped.append({"stage": "offbyone", "model": model, "why": str(e)})
                log.warning("offbyone %s skipped: %s", model, e)
                continue
        paths["offbyone"].append(_in_cache(offbyone_path(cache_dir, lm, p.offbyone, induction=p.circuit), cache_dir))
    grid = matrix(comparisons, 1 + len(cfg.more_b)) if cfg.more_b else []
    run = {"model_a": a, "model_b": b, "more_b": cfg.more_b, "model_c": cfg.model_c, "preset": cfg.preset, "settings": s,
           "feature_scale": cfg.feature_scale, "centre": p.data.centre, "cpu_scan": p.data.cpu_scan,
           "corpus": {k: getattr(p.data, k) for k in ("dataset", "split", "dataset_revision", "text_field", "seed",
                                                      "chunk_tokens")},
           "sae_seed": cfg.sae_seed, "device": p.data.device, "univ_version": __version__,
           "sae_quality": quality, "match": [_in_cache(c.path, cache_dir) for c in comparisons], "circuits": paths,
           "matrix": grid, "skipped": skipped, "seconds": durations, "rerun": p.rerun}
    key = config_key({k: run[k] for k in ("model_a", "model_b", "model_c", "preset", "settings", "corpus", "sae_seed",
                                          "feature_scale", "centre", "cpu_scan")} | ({"more_b": cfg.more_b} if cfg.more_b else {}))
    run_file = cache_dir / RUNS / key / "run.json"
    files.write_json(run_file, run)
    with _stage("report", flags.command("report", "--cache-dir", cache_dir, "--run", run_file)):
        report = write_report(run_file, cfg.out or cache_dir / "report")
    return StudyResult(summary(quality, comparisons, induction, offbyone, skipped), run_file, report, skipped, grid)


def summary(quality, comparisons, induction, offbyone, skipped=()) -> list[dict]:
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
    for c in comparisons:
        if c.name != "main":
            continue
        for row in c.complexity_rows():
            rhos = {k[len("rho_"):]: v for k, v in row.items() if k.startswith("rho_")}
            rows.append({"what": "MPPC vs simplicity", "subject": row["direction"],
                         "result": "Spearman's rho with " + ", ".join(
                             f"{k.replace('_', ' ')} {'n/a' if v is None else f'{v:+.2f}'}" for k, v in rhos.items()),
                         "values": rhos})
    for r in induction:
        table = "head->logit" if r.family == "gpt_neox" else "state->logit"
        top, clean = r.rows[table][0], r.clean[table]
        said = (f"{top['component']}: p(B) {clean['p_B']:.3g} -> {top['p_B']:.3g}" if top["stands_out"] else
                f"no component stands out (largest drop {top['drop']:.2g} ± {top['drop_ci']:.2g}, {top['component']})")
        solved = "" if clean.get("solved", True) else "; the task is not solved (p(B) at chance)"
        rows.append({"what": f"induction ({table})", "subject": r.model, "result": said + solved,
                     "values": {"component": top["component"], "stands_out": top["stands_out"],
                                "clean_p_B": clean["p_B"], "patched_p_B": top["p_B"], "solved": clean.get("solved")}})
    for r in offbyone:
        entries = r.rows[TABLE]
        top = max(entries, key=lambda e: abs(e["delta_logit_B"]))
        rows.append({"what": "off-by-one", "subject": r.model,
                     "result": f"{r.config['component']}: largest change at p = {top['position']} "
                               f"(d logit(B) {top['delta_logit_B']:+.3g}; B sits at 1)",
                     "values": {"component": r.config["component"], "position": top["position"],
                                "delta_logit_B": top["delta_logit_B"]}})
    for skip in skipped:
        rows.append({"what": "off-by-one", "subject": skip["model"], "result": f"not run: {skip['why']}",
                     "values": {"skipped": skip["why"]}})
    return rows
