"""Study plans: parse, expand, cost, run end to end, resume after a kill, refuse without extraction."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import featcache
from featcache.demo import make_demo_dataset
from featcache.progress import Progress, get_verbosity, set_verbosity
from featcache.study.plan import StudyError, load_plan, plan_steps
from probes.results import read_jsonl
from probes.study_run import done_steps, run_study

BACKBONES = ["random:dinov3-vits16", "random:dinov3-vits16plus"]
PLAN = """
out = "{out}"
backbones = {backbones}
resolutions = {resolutions}
n_boot = 20
[extract]
workers = 0
device = "cpu"
[datasets.alpha]
manifest = "alpha/manifest.csv"
[datasets.beta]
manifest = "beta/manifest.csv"
labels = ["cardiomegaly", "effusion"]
[probes.knn]
k = [3, 5]
[probes.logreg]
C = 1.0
[probes.fewshot]
shots = [1, 2]
seeds = 2
head = "prototype"
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    make_demo_dataset(base / "alpha", n_patients=16, images_per_patient=1, size=32, seed=0)
    make_demo_dataset(base / "beta", n_patients=16, images_per_patient=1, size=32, seed=3)
    return base


def _plan(base, out="out", backbones=BACKBONES, resolutions=(16, 32), top="", name=None):
    path = base / f"{name or out}.toml"
    path.write_text(
        top + PLAN.format(out=out, backbones=json.dumps(list(backbones)), resolutions=list(resolutions))
    )
    return path


def _content(path):
    """Rows without their timestamps, in file order."""
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in read_jsonl(path)]


def _hand_gflops(d, ffn, mult, layers, p, regs, res):
    grid = (res // p) ** 2
    n = grid + 1 + regs
    macs = layers * (4 * n * d * d + n * mult * d * ffn + 2 * n * n * d) + grid * 3 * p * p * d
    return 2 * macs / 1e9


def test_plan_expands_every_combination_in_order(data):
    plan = load_plan(_plan(data))
    extractions, steps = plan_steps(plan)
    assert [e.set_name for e in extractions] == [
        f"{d}/{m.replace(':', '-')}/{r}" for d in ("alpha", "beta") for m in BACKBONES for r in (16, 32)
    ]
    assert len(steps) == 8 * 3 and [s.probe for s in steps[:3]] == ["knn", "logreg", "fewshot"]
    assert len({s.key for s in steps}) == len(steps)
    assert steps[0].settings == {"k": [3, 5], "temperature": 0.07}
    assert steps[2].settings["head"] == "prototype" and steps[2].settings["shots"] == [1, 2]
    assert plan.datasets[1].labels == ("cardiomegaly", "effusion")
    # the key follows the settings and the manifest, not the file's formatting
    again = plan_steps(load_plan(_plan(data, out="out")))[1]
    assert [s.key for s in again] == [s.key for s in steps]
    other = plan_steps(load_plan(_plan(data, top="seed = 1\n")))[1]
    assert not {s.key for s in other} & {s.key for s in steps}


def test_dry_run_lists_every_step_and_the_hand_summed_flops(data):
    path = _plan(data)
    result = CliRunner().invoke(featcache, ["study", "plan", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    extractions, steps = plan_steps(load_plan(path))
    for e in extractions:
        assert f"[to run] {e.set_name}  " in result.output
    for s in steps:
        assert f"key={s.key}" in result.output
    # closed form by hand: ViT-S/16 (FFN 1536, GELU: 2 matmuls) and ViT-S+/16 (gated: 3), 4 registers
    n_images = 16  # 16 patients x 1 image, per dataset
    hand = sum(
        2 * n_images * _hand_gflops(384, 1536, mult, 12, 16, 4, res) for mult in (2, 3) for res in (16, 32)
    )
    total = float(re.search(r"total: ([0-9.]+) GFLOP over 128 images", result.output).group(1))
    assert total == pytest.approx(hand, abs=1e-3)
    assert "989 TFLOP/s peak at 40% MFU" in result.output
    assert "to run: 8 extractions, 24 probe runs" in result.output


def test_study_runs_end_to_end_resumes_after_a_kill_and_matches_an_uninterrupted_run(data):
    path = _plan(data, out="killed")
    plan = load_plan(path)

    class Killed(Exception):
        pass

    finished = []

    def kill_after_five(step, n_rows):
        assert n_rows > 0
        finished.append(step.key)
        if len(finished) == 5:
            raise Killed

    with pytest.raises(Killed):
        run_study(plan, after_step=kill_after_five, report=False)
    assert len(done_steps(plan.results)) == 5
    first_rows = len(read_jsonl(plan.results))

    resumed = run_study(plan)
    assert (resumed.steps, resumed.ran, resumed.skipped) == (24, 19, 5)  # nothing done twice
    assert len(resumed.extracted) == 6  # the two sets of the first five runs are complete
    assert len(read_jsonl(plan.results)) == first_rows + resumed.rows
    assert (plan.out / "report.html").is_file() and "alpha" in (plan.out / "report.md").read_text()

    again = run_study(plan, report=False)
    assert (again.ran, again.skipped, again.extracted, again.rows) == (0, 24, [], 0)

    # uninterrupted run on the same features (copied cache): the same rows, in the same order
    ref_plan = load_plan(_plan(data, out="straight"))
    shutil.copytree(plan.cache, ref_plan.cache)
    straight = run_study(ref_plan, report=False)
    assert (straight.ran, straight.extracted) == (24, [])
    killed_rows, straight_rows = _content(plan.results), _content(ref_plan.results)
    for r in killed_rows + straight_rows:
        r.get("params", {}).pop("episodes_file", None)  # where each study saved its episodes
    assert killed_rows == straight_rows

    rows = read_jsonl(plan.results)
    assert {r["probe"] for r in rows} == {"knn", "logreg", "fewshot"}
    assert {(r["dataset"], r["model"], r["res"]) for r in rows} == {
        (d, m, r) for d in ("alpha", "beta") for m in BACKBONES for r in (16, 32)
    }
    beta_labels = {r["label"] for r in rows if r["dataset"] == "beta" and r["metric"] == "auroc"}
    assert beta_labels == {"cardiomegaly", "effusion", "mean"}  # the declared labels only

    out = CliRunner().invoke(featcache, ["study", "plan", str(path)])
    assert "[to run]" not in out.output and "to run: 0 extractions, 0 probe runs" in out.output


def test_no_extract_refuses_with_commands_that_make_the_missing_sets(data, tmp_path):
    path = _plan(data, out=str(tmp_path / "one"), backbones=BACKBONES[:1], resolutions=(16,), name="one")
    text = path.read_text().replace('[datasets.beta]\nmanifest = "beta/manifest.csv"\n', "")
    text = text.replace('labels = ["cardiomegaly", "effusion"]\n', "")
    path.write_text(text)
    plan = load_plan(path)
    with pytest.raises(StudyError) as e:
        run_study(plan, extract=False)
    assert "1 feature sets are not extracted" in str(e.value) and "\n" not in str(e.value)
    (command,) = e.value.commands
    assert command.startswith("featcache extract --model random:dinov3-vits16 --res 16 --data ")
    cli = CliRunner().invoke(featcache, ["study", "run", str(path), "--no-extract"])
    assert cli.exit_code == 1 and cli.output.splitlines()[0] == command
    made = CliRunner().invoke(featcache, shlex.split(command)[1:] + ["--quiet"])
    assert made.exit_code == 0, made.output
    done = run_study(plan, extract=False, report=False)
    assert (done.ran, done.extracted) == (3, [])


def test_torn_last_line_is_dropped_and_said(tmp_path):
    path = tmp_path / "results.jsonl"
    row = {"dataset": "a", "model": "m", "res": 16, "features": "cls", "probe": "knn", "metric": "auroc"}
    row.update(label="mean", value=0.5, params={"study_step": "abc"})
    path.write_text(json.dumps(row) + "\n" + json.dumps(row)[:30])
    notes: list[str] = []
    assert done_steps(path, notes) == {"abc"}
    assert path.read_text() == json.dumps(row) + "\n" and "cut short" in notes[0]


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        ("colour = 1\n", "unknown keys ['colour'] in the plan"),
        ("[probes.svm]\n", "unknown keys ['svm'] in [probes]"),
        ("[probes.knn]\n", "not valid TOML"),
    ],
)
def test_bad_plans_are_one_line_naming_the_plan(data, edit, expect):
    path = _plan(data)
    path.write_text(edit + path.read_text() if "colour" in edit else path.read_text() + edit)
    with pytest.raises(StudyError, match=re.escape(str(path))) as e:
        load_plan(path)
    assert expect in str(e.value)


def test_missing_sections_and_bad_values(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('backbones = ["random:dinov3-vits16"]\nresolutions = [16]\n')
    with pytest.raises(StudyError, match="no 'datasets'"):
        load_plan(path)
    path.write_text('backbones = []\nresolutions = [16]\n[datasets.a]\nmanifest="m.csv"\n[probes.knn]\n')
    with pytest.raises(StudyError, match="'backbones' must be a non-empty string"):
        load_plan(path)


def test_progress_lines_every_interval_when_not_a_terminal():
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(10, "study", unit="runs", enabled=True, stream=stream, interval=30, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 10.0
        bar.update(1)  # a line at 30 s only
    assert stream.getvalue().splitlines() == ["study: 3/10 runs (0.10 runs/s, ETA 1:10)"]
    now[0] = 100.0
    bar.update(6)
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "study: 10/10 runs (0.10 runs/s, 1:40 in all)"
    quiet = io.StringIO()
    with Progress(3, "x", enabled=False, stream=quiet) as off:
        off.update(3)
        off.write("hidden")
    assert quiet.getvalue() == ""


def test_quiet_silences_the_libraries_loading_bars(monkeypatch):
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    for var in (
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_VERBOSITY",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    ):
        monkeypatch.delenv(var, raising=False)
    level = hf_logging.get_verbosity()
    try:
        result = CliRunner().invoke(featcache, ["--quiet", "models", "dinov3-vits16"])
        assert result.exit_code == 0 and get_verbosity() == -1
        assert hub.are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    finally:
        set_verbosity(0)
        hub.enable_progress_bars()
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
    both = CliRunner().invoke(featcache, ["--quiet", "--verbose", "models"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    assert CliRunner().invoke(featcache, ["-v", "models", "dinov3-vits16"]).exit_code == 0
    assert get_verbosity() == 1
    set_verbosity(0)


def _real_manifest(src, out, labels, n_per_split, carve_test=False):
    """A manifest of the first rows of each split of a shared data set (paths stay in ``src``).

    PneumoniaMNIST has no test split and no patient ids (README): its val rows become test, the
    last fifth of the train rows val, and every image is its own patient.
    """
    import csv

    with open(src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if carve_test:
        train = [r for r in rows if r["split"] == "train"]
        for r in rows:
            r["split"] = "test" if r["split"] == "val" else r["split"]
        for r in train[int(0.8 * len(train)) :]:
            r["split"] = "val"
    picked = []
    for split, n in n_per_split.items():
        of = [r for r in rows if r["split"] == split]
        step = max(1, len(of) // n)  # spread over the split, so both classes come along
        picked += of[::step][:n]
    cols = {"path": [], "id": [], "patient_id": [], "split": [], **{lab: [] for lab in labels}}
    for r in picked:
        cols["path"].append(r["image_path"])
        cols["id"].append(r["image_path"].rsplit("/", 1)[-1].removesuffix(".png"))
        cols["patient_id"].append(r["patient_id"] or cols["id"][-1])
        cols["split"].append(r["split"])
        for lab in labels:
            cols[lab].append(int(r["label"] if lab == "pneumonia" else r[lab]))
    from featcache.store.manifest import write_manifest

    return write_manifest(out, cols)


def test_study_on_the_real_chest_xray_sets(shared_data, tmp_path):
    """2 random backbones x 2 resolutions x NIH (tiny64) and PneumoniaMNIST x kNN/logreg/few-shot."""
    torch = pytest.importorskip("torch")
    nih, pneu = shared_data / "nih_cxr14_tiny64", shared_data / "pneumoniamnist_subset"
    if not (nih / "labels.csv").is_file() or not (pneu / "labels.csv").is_file():
        pytest.skip("nih_cxr14_tiny64 or pneumoniamnist_subset missing from the shared data")
    sizes = {"train": 32, "val": 16, "test": 24}
    _real_manifest(nih, tmp_path / "nih.csv", ["no_finding", "infiltration"], sizes)
    _real_manifest(pneu, tmp_path / "pneu.csv", ["pneumonia"], sizes, carve_test=True)
    plan_text = PLAN.format(out="real", backbones=json.dumps(BACKBONES), resolutions=[16, 32])
    plan_text = plan_text.replace(
        '[datasets.alpha]\nmanifest = "alpha/manifest.csv"',
        f'[datasets.nih]\nmanifest = "nih.csv"\nroot = "{nih}"\nlabels = ["no_finding", "infiltration"]',
    ).replace(
        '[datasets.beta]\nmanifest = "beta/manifest.csv"\nlabels = ["cardiomegaly", "effusion"]',
        f'[datasets.pneumonia]\nmanifest = "pneu.csv"\nroot = "{pneu}"\nlabels = ["pneumonia"]',
    )
    path = tmp_path / "real.toml"
    path.write_text(plan_text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_study(load_plan(path), report=False)
    finally:
        torch.set_num_threads(threads)
    assert (result.steps, result.ran, result.skipped) == (24, 24, 0)
    rows = read_jsonl(load_plan(path).results)
    assert {r["dataset"] for r in rows} == {"nih", "pneumonia"}
    assert {(r["model"], r["res"]) for r in rows} == {(m, r) for m in BACKBONES for r in (16, 32)}
    assert {r["probe"] for r in rows} == {"knn", "logreg", "fewshot"}
    means = [r for r in rows if r["metric"] == "auroc" and r["label"] == "mean" and r["probe"] != "fewshot"]
    assert means and all(r["value"] is not None and 0 <= r["value"] <= 1 for r in means)
    # every defined label AUROC carries its ROC, and the curve's area is that AUROC
    import numpy as np

    for r in rows:
        if (
            r["metric"] == "auroc"
            and r["label"] != "mean"
            and r["value"] is not None
            and r["probe"] != "fewshot"
        ):
            roc = r["params"]["roc"]
            assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(r["value"], abs=1e-3)
    counts = {
        d: {r["n_test"] for r in rows if r["dataset"] == d and r["label"] == "mean"}
        for d in ("nih", "pneumonia")
    }
    assert counts == {"nih": {24}, "pneumonia": {24}}


def test_study_sigkilled_mid_run_resumes_without_redoing_finished_steps(data, tmp_path):
    """A real kill (SIGKILL of the `featcache study run` process) once some steps have written rows."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = _plan(data, out="sigkilled", backbones=BACKBONES[:1], resolutions=(16,))
    plan = load_plan(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable,
        "-c",
        "from cli import featcache; featcache()",
        "study",
        "run",
        str(path),
        "--no-report",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if plan.results.is_file() and len(done_steps(plan.results)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study finished before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = done_steps(plan.results)
    assert 2 <= len(before) < 6
    resumed = run_study(plan, report=False)
    assert resumed.skipped == len(before) and resumed.ran == resumed.steps - len(before)
    assert len(done_steps(plan.results)) == resumed.steps  # every step once
