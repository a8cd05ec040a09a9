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

from .errors import UnivError  # noqa: E402
from . import files  # noqa: E402
from .circuit import CircuitResult  # noqa: E402
from .match import load_comparison  # noqa: E402

RUNS = "runs"


def latest_run(cache_dir: Path) -> Path:
    runs = sorted((cache_dir / RUNS).glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UnivError(f"no run in {cache_dir} (run `univ all` first)")
    return runs[-1]


def _fig(title: str, xlabel: str, ylabel: str, size=(7, 4.5)):
    fig, ax = plt.subplots(figsize=size, dpi=120)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    files.write_bytes(path, png.getvalue())
    return path.name


def mppc_figure(comparisons, out: Path, neurons: bool) -> str | None:
    chosen = [c for c in comparisons if c.name.startswith("neurons") == neurons]
    if not chosen:
        return None
    kind = "neurons" if neurons else "SAE features"
    fig, ax = _fig(f"MPPC distribution, {kind} ({chosen[0].a} → other model)",
                   "max pairwise Pearson correlation", "fraction of live features")
    bins = np.linspace(-0.1, 1.0, 45)
    for c in chosen:
        v = c.a_value.flatten()[c.a_fires.flatten()].numpy()
        ax.hist(v, bins=bins, weights=np.full(len(v), 1 / max(len(v), 1)), histtype="step", linewidth=1.8,
                label=f"{c.name}: {c.a} vs {c.b} (median {np.median(v):.2f})")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, out / f"mppc_{'neurons' if neurons else 'features'}.png")


def depth_figure(c, out: Path) -> str:
    fig, ax = _fig(f"Depth map: mean best correlation of {c.a}'s layer-l features\nwithin {c.b}'s layer m",
                   f"{c.b} layer", f"{c.a} layer", size=(8, 5))
    im = ax.imshow(c.depth.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(c.layers_b)), c.layers_b, fontsize=7)
    ax.set_yticks(range(len(c.layers_a)), c.layers_a, fontsize=7)
    fig.colorbar(im, ax=ax, label="mean best Pearson correlation")
    ax.title.set_fontsize(9)
    return _save(fig, out / "depth_map.png")


def mamba_bars(r: CircuitResult, out: Path) -> str:
    fig, ax = _fig(f"{r.model}: induction path patching per layer ({r.config.get('effect', 'direct')} effect)",
                   "layer", "p(B) after patching")
    for offset, (table, color) in enumerate((("state->logit", "tab:blue"), ("y->logit", "tab:orange"))):
        rows = sorted(r.rows[table], key=lambda x: int(x["component"].split()[1]))
        layers = [int(x["component"].split()[1]) for x in rows]
        ax.bar(np.array(layers) + (offset - 0.5) * 0.4, [x["p_B"] for x in rows], width=0.4, color=color, label=table)
        ax.axhline(r.clean[table]["p_B"], color=color, linestyle="--", linewidth=1, label=f"{table}: clean")
    ax.set_xticks(layers)
    ax.legend()
    ax.title.set_fontsize(9)
    return _save(fig, out / f"induction_{_safe(r.model)}.png")


def neox_heatmap(r: CircuitResult, out: Path) -> str:
    rows = r.rows["head->logit"]
    coords = [tuple(int(v) for v in x["component"][1:].split("H")) for x in rows]
    L, H = max(c[0] for c in coords) + 1, max(c[1] for c in coords) + 1
    grid = np.zeros((L, H))
    for (layer, head), x in zip(coords, rows):
        grid[layer, head] = x["drop"]
    fig, ax = _fig(f"{r.model}: drop in p(B) when one head's last-position output\nis patched "
                   f"from a random-sequence run (clean p(B) = {r.clean_p:.4f})", "head", "layer", size=(7, 5))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-abs(grid).max(), vmax=abs(grid).max())
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    fig.colorbar(im, ax=ax, label="clean p(B) − patched p(B)")
    ax.title.set_fontsize(9)
    return _save(fig, out / f"induction_heads_{_safe(r.model)}.png")


def offbyone_figure(results: list[CircuitResult], out: Path) -> str:
    fig, ax = _fig("Off-by-One: B at position 1; only the write at position p corrupted",
                   "position p of the corrupted write", "change of B's mean logit")
    for r in results:
        rows = r.rows["write at position p corrupted"]
        ax.plot([x["position"] for x in rows], [x["delta_logit_B"] for x in rows], marker="o",
                label=f"{r.model} ({r.config['component']})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([1, 2, 3, 4])
    ax.legend(fontsize=8)
    return _save(fig, out / "offbyone.png")


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
    figures = [f for f in (mppc_figure(comparisons, out, False), mppc_figure(comparisons, out, True)) if f]
    main = next((c for c in comparisons if c.name == "main"), None)
    if main is not None:
        figures.append(depth_figure(main, out))
    for r in circuits.get("induction", []):
        figures.append(mamba_bars(r, out) if r.family == "mamba" else neox_heatmap(r, out))
    if circuits.get("offbyone"):
        figures.append(offbyone_figure(circuits["offbyone"], out))
    lines = [f"# univ report: {run['model_a']} vs {run['model_b']}", "",
             f"Preset `{run['preset']}`; configuration: `{run_file.resolve().relative_to(root)}` in the cache.", "",
             "## SAE quality", "",
             _md(run.get("sae_quality", [])), "", "## MPPC summary", "",
             _md([row for c in comparisons for row in c.summary(run.get("dead_as_zero", False))]), ""]
    if main is not None:
        lines += ["## Depth map", "", _md(main.depth_table()), ""]
    for r in circuits.get("induction", []):
        lines += [f"## Induction: {r.model} ({r.config.get('effect', 'direct')} effect)", ""]
        for name, rows in r.rows.items():
            clean = r.clean[name]
            lines += [f"### {name} (top 10 by drop in p(B); clean p(B) = {clean['p_B']:.4g} over {clean['n_seqs']} "
                      "sequences)", "", _md(rows[:10]), ""]
    if circuits.get("offbyone") or run.get("skipped"):
        lines += ["## Off-by-One", ""]
        for r in circuits.get("offbyone", []):
            lines += [f"### {r.model}", "", _md(r.rows["write at position p corrupted"]), ""]
        for skip in run.get("skipped", []):
            lines += [f"### {skip['model']}", "", f"Not run: {skip['why']}.", ""]
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    report = out / "report.md"
    files.write_text(report, "\n".join(lines))
    return {"report": str(report), "figures": [str(out / f) for f in figures]}
