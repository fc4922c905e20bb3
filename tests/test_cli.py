"""The command line: every command's --help, `mpdit params`, and one-line errors."""

import json
import subprocess
import sys

import pytest

import mpdit
from mpdit.cli.main import SUBCOMMANDS, build_parser, main
from mpdit.cli.quickstart import QUICKSTART_STEPS
from mpdit.cli.threads import busy_cores, thread_plan


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"mpdit {command}" in capsys.readouterr().out


def test_params_json_rows(capsys):
    assert main(["params", "--model", "DiT-S/2", "--input-size", "16", "--mp", "all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["conditioning"] for row in rows} >= {"adaln-zero", "scale-shift-gate", "scale-rotation-gate"}
    by_name = {row["conditioning"]: row for row in rows}
    for row in rows:
        assert {"model", "mp", "conditioning", "params"} <= set(row) and isinstance(row["params"], int)
        assert row["mp"] == "all" and row["model"] == "DiT-S/2"
    ssg, srg = by_name["scale-shift-gate"]["params"], by_name["scale-rotation-gate"]["params"]
    assert by_name["scale-rotation-gate"]["vs_scale-shift-gate_pct"] == pytest.approx(100 * (srg - ssg) / ssg, abs=1e-3)


def test_params_table_has_baseline_count(capsys):
    assert main(["params", "--model", "DiT-S/2", "--mp", "none", "--conditioning", "adaln-zero"]) == 0
    assert "32,963,360" in capsys.readouterr().out


def test_params_dyt_rows_add_one_scalar_per_layernorm(capsys):
    assert main(["params", "--model", "DiT-S/2", "--mp", "none;all", "--conditioning", "adaln-zero", "--json"]) == 0
    rows = {(r["mp"], r["norm"]): r["params"] for r in json.loads(capsys.readouterr().out)}
    assert rows[("none", "dyt")] == rows[("none", "layernorm")] + 2 * 12 + 1 == 32_963_385
    assert ("all", "dyt") not in rows  # mp all has no LayerNorm to replace


def test_bench_objective_flow_prints_its_ratio_to_ddpm(capsys):
    assert main(["bench", "--model", "DiT-Nano/4", "--batch", "2", "--input-size", "8", "--num-classes", "10",
                 "--repeats", "2", "--warmup", "1", "--variants", "all:scale-rotation-gate", "--objective", "flow",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["mp"], r["objective"]) for r in rows] == [("none", "ddpm"), ("none", "flow"), ("all", "ddpm"),
                                                         ("all", "flow")]
    for ddpm, flow in (rows[:2], rows[2:]):
        assert flow["train_vs_ddpm"] == pytest.approx(flow["train_ms"] / ddpm["train_ms"], rel=0.02)
        assert flow["params"] < ddpm["params"]  # no variance channels


def test_unknown_model_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "mpdit.cli.main", "params", "--model", "DiT-Q/2"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown model 'DiT-Q/2'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_compilation_is_a_one_line_error(monkeypatch, capsys):
    import torch._dynamo.exc
    import mpdit.cli.params

    def fail(args):
        inner = RuntimeError("C++ compile error\nCommand: g++ ... (a long compiler log)")
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, inner, None)

    monkeypatch.setattr(mpdit.cli.params, "run", fail)  # register() picks it up when main builds its parser
    assert main(["params"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile failed on this machine (RuntimeError: C++ compile error)" in err
    assert "--no-compile" in err


def test_bench_json_fields(capsys):
    assert main(["bench", "--model", "DiT-Nano/4", "--batch", "2", "--input-size", "8", "--num-classes", "10",
                 "--repeats", "2", "--warmup", "1", "--variants", "all:scale-rotation-gate", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["mp"], r["conditioning"]) for r in rows] == [("none", "adaln-zero"), ("all", "scale-rotation-gate")]
    for row in rows:
        assert {"mp", "conditioning", "params", "train_ms", "sample_ms", "peak_mem_mb", "train_ratio",
                "sample_ratio", "mem_ratio"} <= set(row)
        assert row["train_ms"] > 0 and row["sample_ms"] > 0 and row["peak_mem_mb"] > 0
    assert rows[0]["train_ratio"] == rows[0]["sample_ratio"] == rows[0]["mem_ratio"] == 1.0


def test_bench_rejects_bad_variant():
    result = subprocess.run([sys.executable, "-m", "mpdit.cli.main", "bench", "--variants", "all-rotation"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "should look like mp:conditioning" in result.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mpdit {mpdit.__version__}"


def test_train_help_describes_every_option_and_its_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.dest in ("help",):
            continue
        assert action.help, f"--{action.dest} has no description"
        if action.default not in (None, False) and action.dest not in ("option_defaults",):
            assert "default" in action.help, f"--{action.dest} does not show its default"
    text = train.format_help()
    assert f"--min-snr-gamma 5 --lr 3e-2 --steps {QUICKSTART_STEPS} --compile" in text  # how the quickstart's differs


def test_quickstart_help_lists_its_recipe_and_files():
    text = build_parser()._subparsers._group_actions[0].choices["quickstart"].format_help()
    assert "recipe below" not in text
    recipe = f"--min-snr-gamma 5 --lr 3e-2 --steps {QUICKSTART_STEPS} --compile"
    for words in (recipe, "quickstart.npz", "step-NNNNNNN.png", "--no-progress", "--json"):
        assert words in text


@pytest.mark.parametrize("busy,threads,chosen,expected,says", [
    (0.1, 2, False, 2, None),                  # quiet: keep torch's threads, say nothing
    (1.0, 2, False, 1, "using 1 thread instead of 2"),
    (2.0, 2, False, 1, "using 1 thread instead of 2"),
    (1.9, 2, True, 2, "keeping 2 threads from OMP_NUM_THREADS"),
    (2.0, 1, False, 1, None),                  # one thread already: nothing to change
    (3.0, 8, False, 5, "using 5 threads instead of 8"),
])
def test_thread_plan(busy, threads, chosen, expected, says):
    cores = 8 if threads == 8 else 2
    got, line = thread_plan(busy, cores, threads, chosen)
    assert got == expected
    if says is None:
        assert line is None
    else:
        assert says in line and line.count("\n") == 0 and "busy" in line


def test_busy_cores_measures_the_machine():
    busy, cores = busy_cores(interval=0.05)
    assert cores >= 1 and 0 <= busy <= cores + 0.5


def test_library_does_not_import_the_command_line():
    """The layers import downward: nothing outside mpdit/cli imports mpdit.cli."""
    import ast
    from pathlib import Path

    import mpdit

    root = Path(mpdit.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            upward += [f"{path.relative_to(root)}: {name}" for name in names if name.startswith("mpdit.cli")]
    assert not upward, upward
