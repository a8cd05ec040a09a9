"""The command line as a user meets it: tables on stdout, one clear line on stderr for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from univ.cli import main
from univ.store import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def cache_args(assets, tmp_path, *extra, model="mamba"):
    return ["cache", "-m", assets[model], "--dataset", assets["corpus"], "--tokens", "400", "--ctx-len", "24",
            "--chunk-tokens", "96", "--cache-dir", tmp_path / "cache", *extra]


def assert_one_line_error(code, out, err, fragment):
    """The README's rule: one error line, the last on stderr; before it only univ's own log lines
    (stage starts, warnings), never a traceback."""
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("univ: error:"), err
    assert all(line.startswith(("univ: info:", "univ: warning:")) for line in lines[:-1]), err
    assert fragment in lines[-1], lines[-1]


def test_launcher_help():
    result = subprocess.run([sys.executable, str(ROOT / "univ.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("cache", "fit-sae", "match", "induction", "offbyone", "all", "report"):
        assert command in result.stdout


@pytest.mark.parametrize("fmt", ["github", "plain", "csv", "tsv", "latex", "json"])
def test_cache_table_in_every_format_and_hit_prints_the_same(assets, tmp_path, capsys, fmt):
    code, out, _ = run(capsys, *cache_args(assets, tmp_path, "--format", fmt))
    assert code == 0 and "400" in out
    assert run(capsys, *cache_args(assets, tmp_path, "--format", fmt))[1] == out
    if fmt == "json":
        row = json.loads(out)["cache"][0]
        assert (row["rows"], row["d_model"], row["layers"]) == (400, 32, "0-2")
    if fmt == "csv":
        assert out.splitlines()[0] == "model,layers,rows,d_model,store,seconds,tokens_per_s"


def test_bad_inputs_get_one_clear_line(assets, tmp_path, capsys):
    a = cache_args(assets, tmp_path)
    cases = [
        (["cache", "-m", "no-such-model-xyz", "--dataset", assets["corpus"]], "could not be fetched"),
        (["cache", "-m", tmp_path / "missing", "--dataset", assets["corpus"]], "does not exist"),
        ([*a[:4], tmp_path / "none.txt", *a[5:]], "does not exist"),
        ([*a, "--tokens", "0"], "must be positive"),
        ([*a, "--tokens", "-5"], "must be positive"),
        ([*a, "--tokens", "lots"], "--tokens must be a number"),
        ([*a, "--layers", "3"], "layer 3 is out of range"),
        ([*a, "--layers", "0-1"] + ["--ctx-len", "65", "-m", assets["neox"]], "beyond"),
        ([*a, "--format", "yaml"], "yaml"),
        ([*a, "--dtype", "int8"], "unknown dtype"),
        ([*a, "--hook", "attn"], "unknown hook"),
    ]
    for args, fragment in cases:
        assert_one_line_error(*run(capsys, *args), fragment)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert_one_line_error(*run(capsys, *a[:4], empty, *a[5:]), "has no text")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(*run(capsys, *a[:-1], blocker / "cache"), "not writable")


def test_a_newer_cache_format_is_refused_and_kept(assets, tmp_path, capsys):
    assert run(capsys, *cache_args(assets, tmp_path))[0] == 0
    manifest = next((tmp_path / "cache" / "acts").rglob("manifest.json"))
    data = json.loads(manifest.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    manifest.write_text(json.dumps(data))
    assert_one_line_error(*run(capsys, *cache_args(assets, tmp_path)), "upgrade univ")
    assert json.loads(manifest.read_text()) == data


def test_corrupt_chunk_warning_goes_to_stderr(assets, tmp_path, capsys):
    run(capsys, *cache_args(assets, tmp_path))
    chunk = next((tmp_path / "cache" / "acts").rglob("chunk-000001.safetensors"))
    chunk.write_bytes(b"garbage")
    code, out, err = run(capsys, *cache_args(assets, tmp_path))
    assert code == 0 and "400" in out
    assert f"{chunk} is corrupt" in err


def test_unreachable_hub_dataset_is_one_line_and_leaves_no_store(assets, tmp_path, capsys):
    a = cache_args(assets, tmp_path)
    assert_one_line_error(*run(capsys, *a[:4], "someone/no-such-dataset", *a[5:]), "cannot read dataset")
    assert not list((tmp_path / "cache").glob("tokens/*"))


def test_a_run_logged_to_a_file_reports_its_progress(assets, tmp_path, capsys, monkeypatch):
    """stderr that is not a terminal (a log file, nohup) gets progress lines with the rate and
    the time left, where tqdm would stay silent."""
    from univ import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.01)
    code, out, err = run(capsys, *cache_args(assets, tmp_path, "--format", "json"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if "cache tiny-mamba:" in line]
    assert all(line.startswith("univ: info: cache tiny-mamba: ") for line in lines)
    assert any(" tok/s, " in line and " left" in line for line in lines)
    assert lines[-1] == "univ: info: cache tiny-mamba: done, 400 tok in 0m00s"


def test_a_long_step_between_updates_is_not_silent(monkeypatch, caplog):
    """The lines come from a timer: a step that takes minutes (a window of forward passes before the
    first SAE step) still shows the run is alive."""
    import time

    from univ import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)
    with caplog.at_level("INFO", logger="univ"):
        with progress._Lines(10, "work", "it", 0) as bar:
            time.sleep(0.3)
            bar.update(10)
            time.sleep(0.15)
    lines = caplog.messages
    assert lines[0] == "work: 0/10 it (0.0%), 0 it/s, ? left"
    assert any(line.startswith("work: 10/10 it (100.0%)") for line in lines)
    assert lines[-1] == "work: done, 10 it in 0m00s"


def test_many_short_bars_still_show_a_line_every_interval(monkeypatch, caplog):
    """A run made of bars each shorter than the interval (match's comparisons in a row) is not
    silent either: the interval counts from the process's last line, not each bar's start."""
    import time

    from univ import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.12)
    monkeypatch.setattr(progress, "_last_line", [time.monotonic()])
    with caplog.at_level("INFO", logger="univ"):
        for i in range(8):
            with progress._Lines(1, f"short {i}", "it", 0):
                time.sleep(0.05)
    assert 2 <= len([m for m in caplog.messages if m.startswith("short ")]) <= 5, caplog.messages


def test_version_and_bare_univ(capsys):
    from univ import __version__

    code, out, err = run(capsys, "--version")
    assert code == 0 and out.strip() == f"univ {__version__}" and err == ""
    code, out, err = run(capsys)
    assert "Usage" in out + err and "univ: error:" not in err


def test_csv_holds_one_table_that_a_csv_reader_loads(assets, tmp_path, capsys):
    import csv
    import io


    args = ["induction", "-m", assets["mamba"], "--n-seqs", "8", "--seq-len", "16", "--device", "cpu",
            "--cache-dir", tmp_path, "--format", "csv"]
    assert_one_line_error(*run(capsys, *args), "csv holds one table: choose one with --table (clean, state->logit")
    code, out, err = run(capsys, *args, "--table", "y->")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and set(rows[0]) == {"component", "p_B", "logit_B", "drop", "drop_ci", "stands_out"}
    assert_one_line_error(*run(capsys, *args, "--table", "nothing"), "--table 'nothing' names none of the tables")


def test_help_shows_flags_as_flags(capsys):
    code, out, _ = run(capsys, "cache", "--help")
    assert code == 0 and "--force" in out and "<bool>" not in out


def test_one_vocabulary_across_commands():
    """Every command that reads a corpus takes the same corpus options with the same defaults (so each
    finds the token store the others made), and no flag name means two things."""
    import typer

    from univ.cli import app

    commands = typer.main.get_command(app).commands
    options = {name: {opt: p for p in cmd.params for opt in p.opts} for name, cmd in commands.items()}
    corpus = ["--dataset", "--split", "--dataset-revision", "--text-field", "--data-seed", "--chunk-tokens",
              "--batch-contexts", "--centre", "--cpu-scan", "--device", "--cache-dir"]
    for flag in corpus:
        defaults = {name: options[name][flag].default for name in ("cache", "fit-sae", "match", "all")}
        assert len(set(map(str, defaults.values()))) == 1, (flag, defaults)
    for flag in ("--tokens", "--ctx-len"):
        assert len({str(options[name][flag].default) for name in ("cache", "fit-sae", "match")}) == 1, flag
    for flag in ("--sae-seed", "--sae-batch-size", "--sae-train-tokens", "--sae-eval-tokens"):
        assert all(flag in options[name] for name in ("fit-sae", "match", "all")), flag
    for flag in ("--seq-seed", "--batch-seqs"):
        assert all(flag in options[name] for name in ("induction", "offbyone")), flag
    for name, opts in options.items():
        assert not {"--seed", "--batch-size", "--train-tokens", "--eval-tokens"} & set(opts), name
