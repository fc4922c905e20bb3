"""`mpdit sample`, `mpdit eval` and `mpdit quickstart` on a tiny trained run: outputs, determinism, errors."""

import json
import sys

import numpy as np
import pytest
import torch

from mpdit.cli import quickstart
from mpdit.cli.main import build_parser, main
from mpdit.errors import MPDiTError
from mpdit.training.checkpoint import list_checkpoints
from conftest import train_tiny_run


def call(argv):
    """Run a command's function directly, so MPDiTError reaches the test."""
    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_idx):
    return train_tiny_run(tmp_path_factory.mktemp("run"), tiny_idx, steps=4, t_ref=100)


def test_sample_writes_grid_and_adm_npz_deterministically(run_dir, tmp_path, capsys):
    argv = ["sample", "--ckpt", str(run_dir), "--num", "12", "--steps", "4", "--batch-size", "5", "--json"]
    assert main(argv + ["--out", str(tmp_path / "a.png")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["weights"] == "sigma-0.100" and report["num"] == 12
    assert main(argv + ["--out", str(tmp_path / "b.png")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (12, 28, 28, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert a["labels"].tolist() == [i % 10 for i in range(12)]
    assert (tmp_path / "a.png").stat().st_size > 0
    assert main(argv + ["--out", str(tmp_path / "c.png"), "--seed", "1", "--weights", "raw",
                        "--sampler", "ddpm"]) == 0
    assert not np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], a["arr_0"])


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "euler"], "unknown sampler 'euler'"),
    (["--cfg-scale", "-0.5"], "guidance scale must be >= 0"),
    (["--weights", "sigma-0.200"], "has no 'sigma-0.200' weights"),
    (["--classes", "3,12"], "class 12 is out of range"),
])
def test_sample_errors(run_dir, tmp_path, extra, message):
    with pytest.raises(MPDiTError, match=message):
        call(["sample", "--ckpt", str(run_dir), "--num", "2", "--steps", "2", "--out", str(tmp_path / "x.png"),
              *extra])


def test_missing_and_corrupt_checkpoints(run_dir, tmp_path):
    with pytest.raises(MPDiTError, match="no checkpoint found"):
        call(["sample", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])
    broken = tmp_path / "broken"
    broken.mkdir()
    source = run_dir / "checkpoints" / "step-0000004"
    for f in source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(MPDiTError, match="corrupt or truncated"):
        call(["sample", "--ckpt", str(broken), "--weights", "raw", "--out", str(tmp_path / "x.png")])


def test_eval_json_has_metrics_protocol_and_baseline(run_dir, tmp_path, capsys):
    assert main(["eval", "--ckpt", str(run_dir), "--num", "20", "--steps", "3", "--json",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "fd_classifier", "num_images"} <= set(result["metrics"])
    assert 0 <= result["metrics"]["accuracy"] <= 1 and result["metrics"]["num_images"] == 20
    protocol = result["protocol"]
    assert {"num_samples", "sampler", "steps", "cfg_scale", "seed", "feature_network", "reference"} <= set(protocol)
    assert protocol["data"].startswith("idx:")
    # real digits score far better than a 4-step model
    assert result["baseline"]["accuracy"] > 0.9 and result["baseline"]["fd_classifier"] < result["metrics"]["fd_classifier"]
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == result["metrics"]


def test_eval_shows_one_progress_bar_over_all_batches(run_dir, tmp_path, capsys):
    assert main(["eval", "--ckpt", str(run_dir), "--num", "20", "--batch-size", "8", "--steps", "3", "--no-baseline",
                 "--out", str(tmp_path / "eval.json")]) == 0
    captured = capsys.readouterr()
    bars = {line.split(":")[0] for line in captured.err.replace("\r", "\n").splitlines() if "%|" in line}
    assert bars == {"sample 20 images (ddim 3 steps)"}  # one bar, not one per batch of 8
    assert "9/9" in captured.err  # 3 batches x 3 steps
    assert "class accuracy" in captured.out and "%" in captured.out.split("class accuracy")[1].splitlines()[0]


def test_quickstart_runs_end_to_end_and_resumes(tmp_path, capsys):
    qs = tmp_path / "qs"
    base = ["quickstart", "--out", str(qs), "--grid-num", "10", "--eval-num", "20", "--no-compile"]
    assert main(base + ["--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "training the default model for 2 steps" in captured.out
    for line in ("class accuracy", "sample grid:", "training log:", "metrics:", "quickstart.npz", "step-*.png"):
        assert line in captured.out
    assert "{" not in captured.out  # a readable report, no JSON dictionaries
    assert "train:" in captured.err and "sample 20 images" in captured.err  # progress bars
    train_bar = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("train:")][-1]
    assert "2/2 steps" in train_bar and train_bar.count("/s") == 1 and "images/s" in train_bar  # one speed
    assert (qs / "samples" / "quickstart.png").is_file() and (qs / "samples" / "step-0000002.png").is_file()
    protocol = json.loads((qs / "eval.json").read_text())["protocol"]
    assert protocol["num_samples"] == 20 and protocol["cfg_scale"] == 6.0
    train_cfg = json.loads((qs / "train_config.json").read_text())
    assert train_cfg["min_snr_gamma"] == 5 and train_cfg["steps"] == 2  # the quickstart recipe, --steps honoured
    assert train_cfg["compile"] is False  # --no-compile reached training

    # a second call finds the finished run and its finished stages: nothing is trained, sampled or evaluated again
    files = [qs / "log.jsonl", qs / "samples" / "quickstart.png", qs / "samples" / "quickstart.npz", qs / "eval.json"]
    before = [f.stat().st_mtime_ns for f in files]
    assert main(base + ["--no-progress", "--json"]) == 0  # --steps left out: the run's own
    captured = capsys.readouterr()
    assert [f.stat().st_mtime_ns for f in files] == before
    report = json.loads(captured.out)  # --json: one object on stdout, the stages' lines on stderr
    assert report["timings"] == {} and report["checkpoint"].endswith("step-0000002")
    assert report["metrics"] == json.loads((qs / "eval.json").read_text())["metrics"]
    assert "already trained to 2 steps" in captured.err and "%|" not in captured.err  # --no-progress: no bars

    # a larger --steps continues the run, then samples and evaluates the new checkpoint
    assert main(base + ["--steps", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "continuing" in out and "from step 2 to 4" in out
    assert [s for s, _ in list_checkpoints(qs)] == [2, 4]
    assert json.loads((qs / "train_config.json").read_text())["steps"] == 4
    assert json.loads((qs / "eval.json").read_text())["protocol"]["checkpoint"].endswith("step-0000004")
    stages = json.loads((qs / "quickstart.json").read_text())
    assert stages["sample"]["checkpoint"].endswith("step-0000004") and stages["eval"]["num"] == 20
    assert all(f.stat().st_mtime_ns > b for f, b in zip(files, before))

    # a smaller --steps cannot undo training
    with pytest.raises(MPDiTError, match="already trained to 4 steps: --steps 3 cannot go back"):
        call(base + ["--steps", "3"])


def test_quickstart_compiles_where_a_compiler_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not quickstart.can_compile()
    monkeypatch.setenv("CXX", sys.executable)  # any executable stands for a compiler here
    assert quickstart.can_compile()
    argv, plan = quickstart.training_plan(tmp_path / "qs", None, compiled=True)
    assert "--compile" in argv and f"for {quickstart.QUICKSTART_STEPS:,} steps" in plan and "min" in plan
    argv, _ = quickstart.training_plan(tmp_path / "qs", None, compiled=False)
    assert "--no-compile" in argv


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript stand-in for Inception
def test_eval_scores_other_data_only_with_its_own_classifier(run_dir, tmp_path, capsys, shifted_idx,
                                                             shifted_classifier):
    argv = ["eval", "--ckpt", str(run_dir), "--num", "20", "--steps", "2", "--data", shifted_idx, "--json",
            "--out", str(tmp_path / "eval.json")]
    with pytest.raises(MPDiTError, match=r"packaged MNIST classifier labels only \d+% of 20 real idx:.* is not "
                                         r"MNIST: train one for it with `mpdit classifier --data idx:"):
        call(argv)
    assert not (tmp_path / "eval.json").exists()
    assert main(argv + ["--classifier", str(shifted_classifier)]) == 0
    result = json.loads(capsys.readouterr().out)
    scorer = result["protocol"]["classifier"]
    assert scorer["weights"] == str(shifted_classifier / "classifier.safetensors")
    assert scorer["trained_on"] == shifted_idx and scorer["reference_accuracy"] > 0.3
    assert str(shifted_classifier) in result["protocol"]["feature_network"]
    # the baseline is scored by the same classifier: real shifted digits are right under it
    assert result["baseline"]["accuracy"] > 0.3
    # Inception FID alone, with no classifier (a stand-in Inception network)
    from test_evaluation import _PtInceptionStandIn

    with pytest.raises(MPDiTError, match="--classifier none leaves nothing to score"):
        call(argv + ["--classifier", "none"])
    inception = tmp_path / "stand_in.pt"
    torch.jit.script(_PtInceptionStandIn()).save(str(inception))
    assert main(argv + ["--classifier", "none", "--inception", "--inception-weights", str(inception)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {"fid_inception", "sampling_seconds"} and result["protocol"]["classifier"] is None
    assert "fid_inception" in result["baseline"] and "accuracy" not in result["baseline"]
    # the packaged classifier on MNIST data records itself
    assert main(argv[:7] + argv[9:]) == 0
    scorer = json.loads(capsys.readouterr().out)["protocol"]["classifier"]
    assert scorer["weights"] == "packaged: mpdit/evaluation/weights/mnist_classifier.safetensors"
    assert scorer["trained_on"] == "mnist"
    assert scorer["reference_accuracy"] > 0.9
