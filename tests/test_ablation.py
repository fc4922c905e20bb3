"""`mpdit ablate` and `mpdit plot`: tiny grids, skip and resume, results files, plots, grid-file errors."""

import csv
import json

import pytest
import torch

from mpdit.cli.main import build_parser, main
from mpdit.errors import MPDiTError
from mpdit.evaluation.ablation import Budget, Row, load_grid, mean_and_spread, paper_rows, run_grid
from mpdit.model.config import MP_SWITCHES
from mpdit.training import checkpoint as ckpt
from mpdit.training.train import Trainer

ROWS = [Row("dit", "none", "adaln-zero"), Row("mp-srg", "all", "scale-rotation-gate", lr=5e-3)]


def budget(data: str) -> Budget:
    return Budget(model="DiT-Nano/4", data=data, steps=4, batch_size=16, seeds=2, eval_num=20, sample_steps=3,
                  t_ref=50, warmup_steps=2)


def log_length(folder) -> int:
    return len((folder / "log.jsonl").read_text().splitlines())


def test_tiny_grid_writes_results_and_skips_finished_runs(tmp_path, tiny_idx):
    lines = run_grid(tmp_path, ROWS, budget(tiny_idx))
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
    run_grid(tmp_path, ROWS, budget(tiny_idx))
    assert log_length(tmp_path / "runs/dit/seed-0") == before


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
    assert load_grid(grid) == [Row("a", conditioning="rotation", seeds=2)]


def test_paper_preset_rows():
    rows = paper_rows()
    names = [row.name for row in rows]
    assert names[:4] == ["dit", "mp-scale-shift-gate", "mp-scale-rotation-gate", "mp-rotation"]
    assert [row.mp for row in rows[4:]] == list(MP_SWITCHES)
    assert rows[0].optimizer()["lr"] == 1e-4 and rows[0].optimizer()["schedule"] == "constant"
    assert rows[2].optimizer()["lr"] == 1e-2 and rows[2].optimizer()["schedule"] == "edm2"
    assert all(row.seeds == 3 for row in rows[:4]) and all(row.seeds == 1 for row in rows[4:])
