"""The ``probes`` command line: exit codes, what it prints, one-line errors, --help with an Example."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_probes_data import LABELS, build_store

from cli import _int_list, probes
from featcache.errors import FeatcacheError
from probes.results import read_jsonl

COMMANDS = ("knn", "logreg", "fewshot", "compare", "report")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    s = build_store(root, n_patients=30)
    build_store(root, name="toy/other/32", model="random:other", n_patients=30, signal=0.5)
    return s


def _run(*args):
    result = CliRunner().invoke(probes, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = _run(command, "--help")
    assert result.exit_code == 0
    assert "Example: probes " + command in result.output


def test_knn_prints_mean_auroc_per_k_and_appends_rows(store, tmp_path):
    out = tmp_path / "r.jsonl"
    result = _run(
        "knn",
        "--cache",
        store["cache"],
        "--set",
        store["name"],
        "--k",
        "5,10",
        "--bootstrap",
        50,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert f"{len(rows)} rows appended to {out}" in result.output
    for k in (5, 10):
        mean = next(r for r in rows if r["k"] == k and r["label"] == "mean" and r["metric"] == "auroc")
        line = f"{k:>5}  {mean['value']:.3f} [{mean['ci_low']:.3f}, {mean['ci_high']:.3f}]"
        assert line in result.output.splitlines()
    assert {r["label"] for r in rows} == {*LABELS, "mean"}


def test_logreg_options_reach_the_probe(store, tmp_path):
    out = tmp_path / "r.jsonl"
    result = _run(
        "logreg", "--cache", store["cache"], "--set", store["name"], "--C-grid", "0.01,1", "--labels", "nodule",
        "--uncertain", "zeros", "--bootstrap", 20, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert {r["label"] for r in rows} == {"nodule", "mean"}
    nodule = next(r for r in rows if r["label"] == "nodule" and r["metric"] == "auroc")
    assert nodule["C"] in (0.01, 1.0) and nodule["params"]["uncertain"] == "zeros"
    assert f"nodule {nodule['C']:>8g}".replace(" ", "") in result.output.replace(" ", "")
    fixed = _run("logreg", "--cache", store["cache"], "--set", store["name"], "--C", "0.5", "--bootstrap", 20)
    assert fixed.exit_code == 0 and "not saved" in fixed.output
    assert "0.5" in fixed.output


def test_fewshot_range_and_episodes_file(store, tmp_path):
    out = tmp_path / "few.jsonl"
    result = _run(
        "fewshot", "--cache", store["cache"], "--set", store["name"], "--shots", "1..3", "--seeds", 2,
        "--head", "prototype", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert sorted({r["shots"] for r in rows}) == [1, 2, 3]
    assert sorted({r["seed"] for r in rows}) == [0, 1]
    episodes = json.loads((tmp_path / "few.jsonl.episodes.json").read_text())["runs"][0]["episodes"]
    assert len(episodes) == 3 * 2 * len(LABELS)
    assert f"episodes saved to {out}.episodes.json" in result.output
    for s in (1, 2, 3):
        vals = [r["value"] for r in rows if r["shots"] == s and r["label"] == "mean"]
        want = f"{s:>5}  {np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} (2)"
        assert want in result.output.splitlines()


def test_fewshot_rerun_from_episodes_file(store, tmp_path):
    saved = tmp_path / "eps.json"
    base = ["fewshot", "--cache", store["cache"], "--set", store["name"], "--head", "prototype"]
    first = _run(*base, "--shots", "1,2", "--seeds", 2, "--episodes", saved)
    assert first.exit_code == 0 and f"episodes saved to {saved}" in first.output
    again = _run(*base, "--episodes-from", saved)
    assert again.exit_code == 0, again.output
    table = [ln for ln in first.output.splitlines() if ln.startswith("    ")]
    assert table and table == [ln for ln in again.output.splitlines() if ln.startswith("    ")]
    _assert_one_line_error(_run(*base[:-2]), "--shots is required")


def test_shots_syntax():
    assert _int_list("1..4", "--shots") == [1, 2, 3, 4]
    assert _int_list("1,2,4,8,16", "--shots") == [1, 2, 4, 8, 16]
    assert _int_list("1..3,8", "--shots") == [1, 2, 3, 8]
    for bad in ("1..x", "4..1", "1-4", "", "1,,2"):
        with pytest.raises(FeatcacheError, match="range such as 1..16"):
            _int_list(bad, "--shots")


def test_bad_shots_is_one_line(store):
    result = _run("fewshot", "--cache", store["cache"], "--set", store["name"], "--shots", "1-16")
    _assert_one_line_error(result, "--shots '1-16'", "1..16")


def test_bad_set_is_one_line(store):
    result = _run("knn", "--cache", store["cache"], "--set", "nih/nope/224")
    _assert_one_line_error(result, "no feature set 'nih/nope/224'", store["name"])
    result = _run("knn", "--cache", store["cache"])  # two sets: --set is needed
    _assert_one_line_error(result, "choose one with --set")


def test_other_bad_input_is_one_line(store, tmp_path):
    _assert_one_line_error(
        _run("knn", "--cache", store["cache"], "--set", store["name"], "--labels", "hernia"), "unknown labels"
    )
    _assert_one_line_error(
        _run("knn", "--cache", store["cache"], "--set", store["name"], "--features", "pooled+patch"),
        "segmentation",
    )
    _assert_one_line_error(_run("knn", "--cache", tmp_path / "nothing", "--set", "x"), "no feature store")
    _assert_one_line_error(_run("compare", "--cache", store["cache"], "--sets", store["name"]), "exactly two")
    _assert_one_line_error(_run("report", tmp_path / "missing.jsonl"), "not found")


def test_compare_prints_differences(store, tmp_path):
    out = tmp_path / "cmp.jsonl"
    result = _run(
        "compare", "--cache", store["cache"], "--sets", f"{store['name']},toy/other/32", "--probe", "knn",
        "--k", 5, "--bootstrap", 50, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["label"] for r in rows] == [*LABELS, "mean"]
    assert all(r["vs"] == "toy/other/32" and r["metric"] == "auroc_diff" for r in rows)
    for r in rows:
        assert any(
            ln.startswith(r["label"]) and f"{r['value']:.3f}" in ln for ln in result.output.splitlines()
        )
    assert f"{store['name']} minus toy/other/32" in result.output


def test_report_markdown_csv_and_plot(store, tmp_path):
    out = tmp_path / "r.jsonl"
    for name in (store["name"], "toy/other/32"):
        assert (
            _run(
                "logreg", "--cache", store["cache"], "--set", name, "--C", 1, "--bootstrap", 20, "--out", out
            ).exit_code
            == 0
        )
    assert _run(
        "fewshot", "--cache", store["cache"], "--set", store["name"], "--shots", "1,2", "--seeds", 2, "--out", out
    ).exit_code == 0  # fmt: skip
    result = _run("report", out, "--by", "model,res", "--columns", "dataset")
    assert result.exit_code == 0, result.output
    assert "| model | res | toy |" in result.output
    assert (
        sum(
            ln.startswith("| random:")
            for ln in result.output.split("## logreg")[1].split("##")[0].splitlines()
        )
        == 2
    )
    assert "| model | res | shots=1 | shots=2 |" in result.output
    csv_out = _run("report", out, "--format", "csv", "--where", "probe=logreg")
    assert (
        csv_out.exit_code == 0
        and "model,res,dataset,value,sd,ci_low,ci_high,n_seeds" in csv_out.output
        and ",toy," in csv_out.output
        and "shots=1" not in csv_out.output
    )
    png = tmp_path / "few.png"
    plotted = _run("report", out, "--where", "probe=fewshot", "--plot", png)
    assert plotted.exit_code == 0, plotted.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
