"""`univ all` end to end on tiny local models, offline; `univ report` from the cache alone."""

import json
import shlex

import pytest

from univ import fit, models, report, study
from univ.errors import UnivError

from test_cli import assert_one_line_error, run


def all_args(assets, tmp_path):
    return ["all", "--model-a", assets["neox"], "--model-b", assets["mamba"], "--preset", "smoke",
            "--dataset", assets["big_corpus"], "--tokens", "2000", "--ctx-len", "24", "--expansion", "2", "--k", "4",
            "--sae-batch-size", "128", "--sae-train-tokens", "4096", "--sae-eval-tokens", "1000", "--neuron-tokens", "1000", "--n-seqs", "8", "--offbyone-len", "24",
            "--device", "cpu", "--cache-dir", "cache", "--format", "json"]


def test_all_smoke_then_report_then_resume(assets, tmp_path, capsys, monkeypatch):
    # The run uses a cache directory relative to where it starts; the report is asked for later,
    # by an absolute path, from elsewhere: run.json's paths must not depend on the working directory.
    monkeypatch.chdir(tmp_path)
    # An interrupted run: the circuit stage fails; the error names it and how to rerun it.
    real = study.run_induction

    def broken(*a, **k):
        raise UnivError("simulated failure")

    monkeypatch.setattr(study, "run_induction", broken)
    code, out, err = run(capsys, *all_args(assets, tmp_path))
    assert_one_line_error(code, out, err, "stage induction failed: simulated failure")
    assert "rerun it alone with: univ induction --model" in err

    # The rerun resumes: nothing trained again, the rest computed.
    monkeypatch.setattr(study, "run_induction", real)
    monkeypatch.setattr(fit, "_train", lambda *a, **k: pytest.fail("SAEs were trained again"))
    code, out, err = run(capsys, *all_args(assets, tmp_path))
    assert code == 0, err
    tables = json.loads(out)
    whats = [row["what"] for row in tables["summary"]]
    numbers = {row["what"]: row["values"] for row in tables["summary"]}
    assert isinstance(numbers["SAE quality"]["mean_explained_variance"], float)
    assert isinstance(numbers["MPPC main"]["median"], float)
    assert whats.count("SAE quality") == 2
    for name in ("MPPC main", "MPPC random-init", "MPPC sae-seed", "MPPC neurons", "MPPC neurons random-init"):
        assert whats.count(name) == 2, name
    assert whats.count("MPPC vs simplicity") == 2 and set(numbers["MPPC vs simplicity"]) == {
        "token_entropy", "density", "context_spread"}
    assert whats.count("induction (head->logit)") == 1 and whats.count("induction (state->logit)") == 1
    # Random tiny models never learned induction: no component stands out, so there is nothing
    # for the off-by-one analysis to follow, and the summary says so rather than following noise.
    offbyone = [row for row in tables["summary"] if row["what"] == "off-by-one"]
    assert len(offbyone) == 2 and all(row["result"].startswith("not run: no ") for row in offbyone)
    assert all("stands out" in row["result"] for row in tables["summary"] if row["what"].startswith("induction"))
    written = tables["run"][0]
    seconds = json.loads(open(written["run"]).read())["seconds"]
    assert set(seconds) == {"cache", "fit-sae", "match", "induction", "offbyone"} and min(seconds.values()) >= 0
    names = sorted(p.split("/")[-1] for p in written["figures"])
    assert names == sorted(["mppc_features.png", "mppc_neurons.png", "depth_map.png", "mppc_vs_simplicity.png",
                            "induction_heads_tiny-neox.png", "induction_tiny-mamba.png"])
    for figure in written["figures"]:
        with open(figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report_md = open(written["report"]).read()
    assert "## SAE quality" in report_md and "## Not run" in report_md and "- offbyone of " in report_md

    # Each stage's rerun command (in run.json, and in the error when a stage fails) is the stage as
    # `univ all` ran it: run alone, it finds everything in the cache and writes nothing new.
    cache = tmp_path / "cache"

    def snapshot():
        return {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and not {"report", "runs"} & set(p.parts)}

    before = snapshot()
    rerun = json.loads(open(written["run"]).read())["rerun"]
    assert set(rerun) == {"cache", "match", *(f"{stage} {m}" for stage in ("fit-sae", "induction", "offbyone")
                                            for m in (str(assets["neox"]), str(assets["mamba"])))}
    for stage, command in rerun.items():
        code, out, err = run(capsys, *shlex.split(command)[1:])
        if stage.startswith("offbyone"):  # nothing stands out in these models: refused, as in `all`
            assert_one_line_error(code, out, err, "lowers p(B) beyond its 95 % interval")
        else:
            assert code == 0, (command, err)
        assert snapshot() == before, command

    # `univ report` rebuilds the same report from the cache alone: no model loaded, nothing
    # in the cache written.
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and "report" not in p.parts}
    monkeypatch.setattr(models, "load_source", lambda *a, **k: pytest.fail("report loaded a model"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run(capsys, "report", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "again",
                         "--format", "json")
    assert code == 0, err
    assert (tmp_path / "again" / "report.md").read_text() == report_md
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and "report" not in p.parts} == before
    assert len(json.loads(out)["report"]) == 1 + 1 + 6  # report.md, index.html, the figures

    # Figures name the models by short stable labels (A, B, with a key), whatever their paths,
    # and keep their legends off the data.
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path.name)
    report.write_report(tmp_path / written["run"], tmp_path / "figures")
    assert len(figures) == 6
    for fig in figures:
        fig.canvas.draw()
        ax = fig.axes[0]
        texts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        assert not any(str(tmp_path) in t or "/" in t for t in texts), texts
        assert any("A = tiny-neox, B = tiny-mamba" in t.get_text() for t in fig.texts)
        legend = ax.get_legend()
        if legend is not None:
            assert legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_report_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "report", "--cache-dir", tmp_path), "no run")


def test_unknown_preset(assets, tmp_path, capsys):
    args = all_args(assets, tmp_path)
    args[args.index("smoke")] = "huge"
    assert_one_line_error(*run(capsys, *args), "unknown preset")


def test_model_c_adds_the_model_seed_skyline_under_every_preset():
    for preset in study.PRESETS:
        with_c = study.StudyConfig(model_a="a", model_b="b", model_c="c", preset=preset).settings()
        without = study.StudyConfig(model_a="a", model_b="b", preset=preset).settings()
        assert "model-seed" in with_c["skylines"] and "model-seed" not in without["skylines"]
