"""`univ report`: report.md and PNG figures from what a run left in the cache (no recomputing).

A run (`univ all`) records what it produced in ``runs/<key>/run.json``; the report reads that
file and the artefacts it names: SAE metrics, match results, circuit results.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

import torch  # noqa: E402

from . import files, models  # noqa: E402
from .circuit import CircuitResult  # noqa: E402
from .errors import UnivError  # noqa: E402
from .examples import PROXIES, proxies  # noqa: E402
from .explorer import examples_of, windows_of, write_explorer  # noqa: E402
from .match import load_comparison  # noqa: E402
from .match_stage import letters  # noqa: E402

RUNS = "runs"


def latest_run(cache_dir: Path) -> Path:
    runs = sorted((cache_dir / RUNS).glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UnivError(f"no run in {cache_dir} (run `univ all` first)")
    return runs[-1]


ROLES = {"main": "A vs B", "random-init": "A vs B at random init", "sae-seed": "A vs A's SAEs with seed + 1",
         "model-seed": "A vs C", "neurons": "A vs B", "neurons random-init": "A vs B at random init"}
"""What each comparison of `univ match` sets against what, in the report's short labels."""


def role(name: str) -> str:
    """ROLES, and the comparisons among several B models: A-B2, random-init B2, B-B2, ..."""
    if name in ROLES:
        return ROLES[name]
    if name.startswith("random-init "):
        return f"A vs {name.split()[1]} at random init"
    return " vs ".join(name.split("-", 1)) if "-" in name else name


def _from_a(name: str) -> bool:
    """Comparisons whose first side is A's features."""
    return name in ROLES or name.startswith(("A-", "random-init "))


def short_name(model: str) -> str:
    """A model as figures name it: a local folder by its last part, a Hub id or alias as given."""
    return Path(model).name if model.startswith((".", "/", "~")) else model


def letters_of(run: dict) -> dict[str, str]:
    """Model -> its short label: A, B (B2, B3, ... for further models), C (the model-seed skyline)."""
    bs = [run["model_b"], *run.get("more_b", [])]
    out = {run["model_a"]: "A", **dict(zip(bs, letters(len(bs))[1:]))}
    return out | ({run["model_c"]: "C"} if run.get("model_c") else {})


def key_line(run: dict) -> str:
    """The key to the figures' short labels."""
    return ", ".join(f"{letter} = {short_name(m)}" for m, letter in letters_of(run).items())


def _fig(title: str, xlabel: str, ylabel: str, key: str, size=(7, 4.5)):
    fig, ax = plt.subplots(figsize=size, dpi=120)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.text(0.01, 0.005, key, fontsize=7, color="0.35", ha="left", va="bottom")
    return fig, ax


def _legend_outside(ax) -> None:
    """Legends sit to the right of the axes, never on the data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _save(fig, path: Path) -> str:
    fig.tight_layout(rect=(0, 0.03, 1, 1))  # room for the key line at the bottom
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    plt.close(fig)
    files.write_bytes(path, png.getvalue())
    return path.name


def mppc_figure(comparisons, out: Path, neurons: bool, key: str) -> str | None:
    chosen = [c for c in comparisons if c.name.startswith("neurons") == neurons and _from_a(c.name)]
    if not chosen:
        return None
    kind = "neurons" if neurons else "SAE features"
    fig, ax = _fig(f"MPPC of A's {kind}: each one's best correlation with the other side",
                   "max pairwise Pearson correlation", "fraction of live features", key)
    bins = np.linspace(-0.1, 1.0, 45)
    for c in chosen:
        v = c.a_value.flatten()[c.a_fires.flatten()].numpy()
        ax.hist(v, bins=bins, weights=np.full(len(v), 1 / max(len(v), 1)), histtype="step", linewidth=1.8,
                label=f"{role(c.name)}\n(median {np.median(v):.2g})")
    _legend_outside(ax)
    return _save(fig, out / f"mppc_{'neurons' if neurons else 'features'}.png")


def depth_figure(c, out: Path, key: str) -> str:
    x, y = _pair_letters(c.name)
    fig, ax = _fig(f"Depth map: mean best correlation of {x}'s layer-l features within {y}'s layer m",
                   f"{y} layer m", f"{x} layer l", key, size=(8, 5))
    im = ax.imshow(c.depth.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(c.layers_b)), c.layers_b, fontsize=7)
    ax.set_yticks(range(len(c.layers_a)), c.layers_a, fontsize=7)
    fig.colorbar(im, ax=ax, label="mean best Pearson correlation")
    return _save(fig, out / ("depth_map.png" if c.name == "main" else f"depth_map_{_safe(c.name)}.png"))


def _pair_letters(name: str) -> tuple[str, str]:
    """The two models of a comparison between the study's models: main is A-B; A-B2, B-B2, ..."""
    return ("A", "B") if name == "main" else tuple(name.split("-", 1))


def _is_pair(name: str) -> bool:
    return name == "main" or (name.count("-") == 1 and all(p[:1] in "AB" for p in name.split("-")))


def mamba_bars(r: CircuitResult, out: Path, label: str, key: str) -> str:
    fig, ax = _fig(f"{label}: induction path patching per layer ({r.config.get('effect', 'direct')} effect)",
                   "layer", "p(B) after patching", key)
    second = "y->logit" if r.family == "mamba" else "time-mix->logit"
    for offset, (table, color) in enumerate((("state->logit", "tab:blue"), (second, "tab:orange"))):
        rows = sorted(r.rows[table], key=lambda x: int(x["component"].split()[1]))
        layers = [int(x["component"].split()[1]) for x in rows]
        ax.bar(np.array(layers) + (offset - 0.5) * 0.4, [x["p_B"] for x in rows], width=0.4, color=color, label=table)
        ax.axhline(r.clean[table]["p_B"], color=color, linestyle="--", linewidth=1, label=f"{table}: clean")
    ax.set_xticks(layers)
    _legend_outside(ax)
    return _save(fig, out / f"induction_{_safe(r.model)}.png")


def neox_heatmap(r: CircuitResult, out: Path, label: str, key: str) -> str:
    rows = r.rows["head->logit"]
    coords = [tuple(int(v) for v in x["component"][1:].split("H")) for x in rows]
    L, H = max(c[0] for c in coords) + 1, max(c[1] for c in coords) + 1
    grid = np.zeros((L, H))
    for (layer, head), x in zip(coords, rows):
        grid[layer, head] = x["drop"]
    fig, ax = _fig(f"{label}: drop in p(B) when one head's last-position output\nis patched "
                   f"from a random-sequence run (clean p(B) = {r.clean_p:.3g})", "head", "layer", key, size=(7, 5))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-abs(grid).max(), vmax=abs(grid).max())
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    fig.colorbar(im, ax=ax, label="clean p(B) − patched p(B)")
    return _save(fig, out / f"induction_heads_{_safe(r.model)}.png")


def offbyone_figure(results: list[CircuitResult], out: Path, labels: dict[str, str], key: str) -> str:
    fig, ax = _fig("Off-by-One: B at position 1; only the write at position p corrupted",
                   "position p of the corrupted write", "change of B's mean logit", key)
    for r in results:
        rows = r.rows["write at position p corrupted"]
        ax.plot([x["position"] for x in rows], [x["delta_logit_B"] for x in rows], marker="o",
                label=f"{labels.get(r.model, short_name(r.model))}: {r.config['component']}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([1, 2, 3, 4])
    _legend_outside(ax)
    return _save(fig, out / "offbyone.png")


def complexity_figure(c, examples: dict, window, out: Path, key: str) -> str | None:
    """MPPC of A's live features against each simplicity proxy (the paper: the simplest features
    match best), with Spearman's rho."""
    exs = [examples["a"].get(layer) for layer in c.layers_a]
    if any(ex is None for ex in exs):
        return None
    per_layer = [proxies(ex, window) for ex in exs]
    alive = c.a_fires.flatten().numpy()
    mppc = c.a_value.flatten().numpy()[alive]
    shown = [p for p in PROXIES if not np.isnan(torch.cat([x[p] for x in per_layer]).numpy()[alive]).all()]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.8), dpi=120, squeeze=False)
    labels = {"token_entropy": "entropy of the top tokens (bits)", "density": "firing density (log10)",
              "context_spread": "distinct contexts among the top 20"}
    for ax, p in zip(axes[0], shown):
        x = torch.cat([v[p] for v in per_layer]).numpy()[alive]
        if p == "density":
            x = np.log10(np.maximum(x, 1e-9))
        ax.hexbin(x, mppc, gridsize=30, mincnt=1, cmap="viridis", bins="log")
        rho = c.complexity.get("a", {}).get(p)
        ax.set_title(f"Spearman's rho {rho:.2g}" if rho is not None else "", fontsize=9)
        ax.set_xlabel(labels[p], fontsize=9)
        ax.set_ylabel("MPPC" if p == shown[0] else "")
    fig.suptitle(f"MPPC of A's features against how simple they are ({role(c.name)})", fontsize=10)
    fig.text(0.01, 0.005, key, fontsize=7, color="0.35", ha="left", va="bottom")
    return _save(fig, out / "mppc_vs_simplicity.png")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(name).name or name)


def _md(rows: list[dict]) -> str:
    return tabulate(rows, headers="keys", tablefmt="github", floatfmt="g") if rows else "(none)"


def _comparison(path: Path):
    result = load_comparison(path)
    if result is None:
        raise UnivError(f"{path} is missing or unreadable; rerun `univ all` to compute it again")
    return result


def _circuit(path: Path) -> CircuitResult:
    result = CircuitResult.load(path)
    if result is None:
        raise UnivError(f"{path} is missing or unreadable; rerun `univ all` to compute it again")
    return result


def write_report(run_file: Path, out: Path) -> dict:
    """Write report.md and the figures; returns {'report': path, 'figures': [paths]}."""
    try:
        run = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnivError(f"cannot read {run_file}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    root = run_file.resolve().parents[2]  # <cache>/runs/<key>/run.json: its paths are relative to <cache>
    comparisons = [_comparison(root / p) for p in run.get("match", [])]
    circuits = {kind: [_circuit(root / p) for p in paths] for kind, paths in run.get("circuits", {}).items()}
    key = key_line(run)
    labels = letters_of(run)
    examples = [examples_of(c) for c in comparisons]
    windows = windows_of(comparisons, root)
    figures = [f for f in (mppc_figure(comparisons, out, False, key), mppc_figure(comparisons, out, True, key)) if f]
    main = next((c for c in comparisons if c.name == "main"), None)
    figures += [depth_figure(c, out, key) for c in comparisons if _is_pair(c.name)]
    if main is not None:
        simplicity = complexity_figure(main, examples[comparisons.index(main)], windows[main.tokens_store], out, key)
        figures += [simplicity] if simplicity else []
    for r in circuits.get("induction", []):
        label = labels.get(r.model, short_name(r.model))
        figures.append(neox_heatmap(r, out, label, key) if r.family == "gpt_neox" else mamba_bars(r, out, label, key))
    if circuits.get("offbyone"):
        figures.append(offbyone_figure(circuits["offbyone"], out, labels, key))
    lines = [f"# univ report: {run['model_a']} vs {run['model_b']}", "",
             f"Preset `{run['preset']}`; configuration: `{run_file.resolve().relative_to(root)}` in the cache. "
             f"Figures call the models {key}.", "",
             "## SAE quality", "",
             _md(run.get("sae_quality", [])), "", "## MPPC summary", "",
             _md([row for c in comparisons for row in c.summary(run.get("dead_as_zero", False))]), ""]
    complexity = [row for c in comparisons for row in c.complexity_rows()]
    lines += ["## MPPC and simplicity", "", "Spearman's rho between a live feature's MPPC and each proxy of how "
              "simple it is: the entropy of the token ids at its top 20 activations, its firing density, and the "
              "fraction of distinct contexts among them (the paper: the simplest features match best, so a "
              "negative rho for entropy).", "", _md(complexity), ""]
    if run.get("matrix"):
        lines += ["## MPPC between every pair of models", "", _md(run["matrix"]), ""]
    if main is not None:
        lines += ["## Depth map", "", _md(main.depth_table()), ""]
    for r in circuits.get("induction", []):
        lines += [f"## Induction: {r.model} ({r.config.get('effect', 'direct')} effect)", ""]
        for name, rows in r.rows.items():
            clean = r.clean[name]
            lines += [f"### {name} (top 10 by drop in p(B); clean p(B) = {clean['p_B']:.4g} over {clean['n_seqs']} "
                      "sequences)", "", _md(rows[:10]), ""]
    if circuits.get("offbyone"):
        lines += ["## Off-by-One", ""]
        for r in circuits.get("offbyone", []):
            lines += [f"### {r.model}", "", _md(r.rows["write at position p corrupted"]), ""]
    if run.get("skipped"):
        lines += ["## Not run", ""] + [f"- {skip['stage']} of {skip['model']}: {skip['why']}." for skip in run["skipped"]]
        lines += [""]
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["The feature pairs, side by side with their top-activating contexts: `index.html` (opens from "
              "disk in a browser).", ""]
    report = out / "report.md"
    files.write_text(report, "\n".join(lines))
    tables = {"SAE quality": run.get("sae_quality", []),
              "MPPC summary": [row for c in comparisons for row in c.summary(run.get("dead_as_zero", False))],
              "MPPC and simplicity (Spearman's rho)": complexity,
              **({"MPPC between every pair of models": run["matrix"]} if run.get("matrix") else {}),
              **({"depth map": main.depth_table()} if main is not None else {})}
    page = write_explorer(comparisons, examples, windows, out, _tokenizer(run), tables, figures,
                          f"univ report: {short_name(run['model_a'])} vs {short_name(run['model_b'])}", key,
                          {c.name: role(c.name) for c in comparisons})
    return {"report": str(report), "figures": [str(out / f) for f in figures], "page": str(page)}


def _tokenizer(run: dict):
    """A's tokenizer, to show the contexts as text; None (token ids shown) when it cannot be had."""
    try:
        return models.load_tokenizer(models.resolve(run["model_a"]))
    except UnivError:
        return None
