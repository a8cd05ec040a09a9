"""What `univ match` runs: builds each side's features (caching activations and fitting SAEs
where they are missing) and the comparisons the options ask for."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import models
from .cache import CacheConfig, run_cache
from .errors import UnivError
from .fit import FitConfig, run_fit, select_layers, stores_at
from .match import Comparison, MatchConfig, Side, compare
from .options import parse_layers
from .sae import FEATURE_SCALES, SAE
from .store import Store, config_key, resid_hook

log = logging.getLogger("univ")
BASELINES = ("random-init",)
SKYLINES = ("sae-seed", "model-seed")


@dataclass
class MatchRequest:
    """Everything `univ match` was asked for."""

    model_a: str | None = None
    model_b: str | None = None
    more_b: list[str] = field(default_factory=list)
    """Further models: every pair among A, B and these is compared (named B2, B3, ... after B)."""
    model_c: str | None = None
    """Same architecture and size as A, another training seed (the model-seed skyline)."""
    acts_a: Path | None = None
    acts_b: Path | None = None
    saes_a: Path | None = None
    """Folder holding A's SAE folders (cfg.json + sae.safetensors); without it A's raw activations are matched."""
    saes_b: Path | None = None
    layers_a: str = "all"
    layers_b: str = "all"
    baselines: list[str] = field(default_factory=list)
    skylines: list[str] = field(default_factory=list)
    neurons: bool = False
    neuron_tokens: int = 100_000
    """Window of the neuron comparisons (the study: 100K tokens)."""
    data: CacheConfig | None = None
    """Template for caching: corpus, token count (= the window), context length, dtype, device."""
    fit: FitConfig = field(default_factory=FitConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    cache_dir: Path = Path("univ-cache")


def _check(req: MatchRequest) -> None:
    by_model, by_path = req.model_a or req.model_b, req.acts_a or req.acts_b
    if by_model and by_path:
        raise UnivError("give models (--model-a/--model-b) or stores (--acts-a/--acts-b), not both")
    if by_model and not (req.model_a and req.model_b):
        raise UnivError("give both --model-a and --model-b")
    if by_path and not (req.acts_a and req.acts_b):
        raise UnivError("give both --acts-a and --acts-b")
    if not (by_model or by_path):
        raise UnivError("give --model-a and --model-b (or --acts-a and --acts-b)")
    if req.match.feature_scale not in FEATURE_SCALES:
        raise UnivError(f"unknown feature scale {req.match.feature_scale!r} (use {' or '.join(FEATURE_SCALES)})")
    for b in req.baselines:
        if b not in BASELINES:
            raise UnivError(f"unknown baseline {b!r} (use {', '.join(BASELINES)})")
    for s in req.skylines:
        if s not in SKYLINES:
            raise UnivError(f"unknown skyline {s!r} (use {', '.join(SKYLINES)})")
    if "model-seed" in req.skylines and not req.model_c:
        raise UnivError("--skyline model-seed needs --model-c (A's architecture, another seed)")
    if by_path and (req.baselines or req.skylines or req.neurons or req.more_b):
        raise UnivError("reference points need models (--model-a/--model-b), not stores given by path")


def _cache_cfg(req: MatchRequest, models_: list[str], **kw) -> CacheConfig:
    return dataclasses.replace(req.data, models=models_, cache_dir=req.cache_dir, **kw)


def sae_side(req: MatchRequest, model: str, layers: str, seed: int | None = None, label: str | None = None) -> Side:
    """A model's SAE features: its cached residual streams over the window, and one SAE per layer
    (fitted if missing, on activations streamed from the documents after the window)."""
    fit_cfg = dataclasses.replace(req.fit, seed=req.fit.seed if seed is None else seed)
    results = run_fit(fit_cfg, layers, req.cache_dir, cache_cfg=_cache_cfg(req, [model]))
    root = Path(run_cache(_cache_cfg(req, [model], layers=layers)).models[0].store)
    device = models.resolve_device(req.match.device)
    stores, encoders, ident = {}, {}, {}
    for r in results:
        sae = SAE.load(r.path, device)
        stores[r.layer] = Store.read(root / resid_hook(r.layer))
        encoders[r.layer] = functools.partial(sae.features, feature_scale=req.match.feature_scale)
        ident[r.layer] = sae.cfg.weights_sha256
    return Side(label or model, stores, encoders, {"saes": ident, "acts": {layer: _content(s) for layer, s in stores.items()},
                                                   "feature_scale": req.match.feature_scale})


def neuron_side(req: MatchRequest, model: str, layers: str) -> Side:
    cfg = _cache_cfg(req, [model], hook="neurons", tokens=req.neuron_tokens, layers=layers)
    root = Path(run_cache(cfg).models[0].store)
    n_layers = models.resolve(model).n_layers
    stores = {layer: Store.read(root / resid_hook(layer, "neurons")) for layer in parse_layers(layers, n_layers)}
    return Side(f"{model} neurons", stores, {layer: None for layer in stores},
                {"neurons": {layer: _content(s) for layer, s in stores.items()}})


def path_side(label: str, acts: Path, saes: Path | None, layers: str, cfg: MatchConfig) -> Side:
    all_stores = stores_at(acts)
    chosen = select_layers(all_stores, layers)
    stores = {layer: all_stores[layer] for layer in chosen}
    if saes is None:
        return Side(label, stores, {layer: None for layer in chosen},
                    {"acts": {layer: _content(s) for layer, s in stores.items()}})
    found = {}
    for cfg_file in sorted(Path(saes).rglob("cfg.json")):
        sae = SAE.load(cfg_file.parent, models.resolve_device(cfg.device))
        layer = sae.cfg.store.get("config", {}).get("layer")
        if layer in stores:
            _check_trained_on(sae, cfg_file.parent, stores[layer])
            found[layer] = sae
    missing = [layer for layer in chosen if layer not in found]
    if missing:
        raise UnivError(f"{saes} holds no SAE trained on layer {missing[0]} of {acts}")
    return Side(label, stores,
                {layer: functools.partial(found[layer].features, feature_scale=cfg.feature_scale) for layer in chosen},
                {"saes": {layer: found[layer].cfg.weights_sha256 for layer in chosen},
                 "acts": {layer: _content(s) for layer, s in stores.items()}, "feature_scale": cfg.feature_scale})


def _content(store: Store) -> str:
    """A store's identity by content (its chunks' sha256s), however its path is spelled."""
    return config_key({"chunks": [c["sha256"] for c in store.manifest["chunks"]]})


def _describe(config: dict) -> str:
    model = config.get("model") or {}
    return f"{model.get('ref', 'an unrecorded model')} {config.get('hook', 'an unrecorded hook')}"


def _check_trained_on(sae: SAE, where: Path, store: Store) -> None:
    """Refuse SAEs trained on another model's (or hook's, or centring's) activations; SAEs of the
    same model and hook trained on another store (or streamed) are used, and that is said."""
    trained, given = sae.cfg.store.get("config", {}), store.config
    if trained == given:
        return
    if trained.get("model") and all(trained.get(k) == given.get(k) for k in ("model", "hook", "centred")):
        log.info("%s was trained on other activations of %s (%s); matching it on %s", where, _describe(trained),
                 "streamed" if "stream" in sae.cfg.store else sae.cfg.store.get("path", "another store"), store.path)
        return
    raise UnivError(f"{where} was trained on {_describe(trained)}, but {store.path} holds {_describe(given)}; "
                    "give SAEs trained on this model and hook")


def run_match(req: MatchRequest, progress: bool = True) -> list[Comparison]:
    """The main comparison, then each reference point asked for."""
    _check(req)
    out_root = req.cache_dir / "match"
    if req.acts_a:
        a = path_side(str(req.acts_a), req.acts_a, req.saes_a, req.layers_a, req.match)
        b = path_side(str(req.acts_b), req.acts_b, req.saes_b, req.layers_b, req.match)
        return [compare("main", a, b, req.match, out_root, progress)]
    # One cache call for every model: one shared token store, and a clear refusal when the
    # tokenizers differ.
    bs = [req.model_b, *req.more_b]
    everyone = [req.model_a, *bs] + ([req.model_c] if req.model_c else [])
    everyone += [models.RANDOM_PREFIX + b for b in bs] if "random-init" in req.baselines else []
    run_cache(_cache_cfg(req, everyone, layers="all"), progress)
    a = sae_side(req, req.model_a, req.layers_a)
    results = [compare("main", a, sae_side(req, req.model_b, req.layers_b), req.match, out_root, progress)]
    if "random-init" in req.baselines:
        b0 = sae_side(req, models.RANDOM_PREFIX + req.model_b, req.layers_b)
        results.append(compare("random-init", a, b0, req.match, out_root, progress))
    if "sae-seed" in req.skylines:
        seed = req.fit.seed + 1
        a2 = sae_side(req, req.model_a, req.layers_a, seed=seed, label=f"{req.model_a} (SAE seed {seed})")
        results.append(compare("sae-seed", a, a2, req.match, out_root, progress))
    if "model-seed" in req.skylines:
        results.append(compare("model-seed", a, sae_side(req, req.model_c, req.layers_a), req.match, out_root, progress))
    if req.neurons:
        neuron_match = dataclasses.replace(req.match, tokens=req.neuron_tokens)
        an = neuron_side(req, req.model_a, req.layers_a)
        results.append(compare("neurons", an, neuron_side(req, req.model_b, req.layers_b), neuron_match,
                               out_root, progress))
        if "random-init" in req.baselines:
            bn0 = neuron_side(req, models.RANDOM_PREFIX + req.model_b, req.layers_b)
            results.append(compare("neurons random-init", an, bn0, neuron_match, out_root, progress))
    results += _more_models(req, a, out_root, progress)
    return results


def letters(n_b: int) -> list[str]:
    """The short names of A and the B models: A, B, B2, B3, ..."""
    return ["A", "B"] + [f"B{i}" for i in range(2, n_b + 1)]


def _more_models(req: MatchRequest, a: Side, out_root: Path, progress: bool) -> list[Comparison]:
    """With several B models: A against each further one (and its random-init baseline), and every
    pair of B models, named by their letters (A-B2, B-B2, random-init B2, ...)."""
    if not req.more_b:
        return []
    names = letters(1 + len(req.more_b))
    sides = {names[1]: sae_side(req, req.model_b, req.layers_b)}
    sides.update({names[i + 2]: sae_side(req, m, req.layers_b) for i, m in enumerate(req.more_b)})
    out = []
    for i, m in enumerate(req.more_b):
        name = names[i + 2]
        out.append(compare(f"A-{name}", a, sides[name], req.match, out_root, progress))
        if "random-init" in req.baselines:
            out.append(compare(f"random-init {name}", a, sae_side(req, models.RANDOM_PREFIX + m, req.layers_b),
                               req.match, out_root, progress))
    bnames = list(sides)
    for i, x in enumerate(bnames):
        for y in bnames[i + 1:]:
            out.append(compare(f"{x}-{y}", sides[x], sides[y], req.match, out_root, progress))
    return out


def matrix(results: list[Comparison], n_b: int) -> list[dict]:
    """MPPC between every ordered pair of A and the B models (live features), with A's
    random-init baseline against the target's architecture."""
    names = letters(n_b)
    pair = {"main": ("A", "B")} | {f"A-{n}": ("A", n) for n in names[2:]}
    pair |= {f"{x}-{y}": (x, y) for i, x in enumerate(names[1:]) for y in names[i + 2:]}
    baseline = {"B": "random-init"} | {n: f"random-init {n}" for n in names[2:]}
    by_name = {c.name: c for c in results}
    rows = []
    for name, (x, y) in pair.items():
        c = by_name.get(name)
        if c is None:
            continue
        there, back = c.summary(False)
        for (src, dst), row in (((x, y), there), ((y, x), back)):
            base = by_name.get(baseline.get(dst, "")) if src == "A" else None
            rows.append({"from": src, "to": dst, "mean": row["mean"], "median": row["median"], ">=0.5": row[">=0.5"],
                         ">=0.7": row[">=0.7"], "random-init mean": base.summary(False)[0]["mean"] if base else None})
    return rows
