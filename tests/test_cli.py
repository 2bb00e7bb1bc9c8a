"""The command line: help on every command and option, describe, show, bench and the demo."""

import argparse
import re
import sys
from pathlib import Path

import pytest

import usim
from usim.__main__ import build_op, describe_checkpoint, find_bench_script, main, make_parser, parse_layers

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_progress():
    from usim.progress import progress_enabled, set_progress

    before = progress_enabled()
    yield
    set_progress(before)


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise AssertionError("no subcommands")


def test_every_command_and_option_has_help():
    parser = make_parser()
    commands = _subparsers(parser)
    assert set(commands.choices) == {"demo", "show", "describe", "bench", "export"}
    helped = {a.dest for a in commands._choices_actions if a.help}
    assert helped == set(commands.choices), "every command has a one-line help"
    for name, sub in [("python -m usim", parser)] + list(commands.choices.items()):
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings or action.dest}"


@pytest.mark.parametrize("command", [[], ["demo"], ["show"], ["describe"], ["bench"], ["export"]])
def test_help_prints_and_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(command + ["--help"])
    assert done.value.code == 0
    assert "usage: python -m usim" in capsys.readouterr().out


def test_describe_an_op_checkpoint():
    path = CHECKPOINTS / "matmul_4x4x4.safetensors"
    op = usim.load(path)
    text = describe_checkpoint(path)
    assert "MatMul (usim.MatMul)" in text and "n=4, m=4, p=4" in text
    assert re.search(rf"format version\s+{usim.checkpoint.FORMAT_VERSION}", text)
    assert re.search(rf"layers\s+{op.depth}, with at most {op.width} attention heads", text)
    first = op.encoder.layers[0]
    heads = first.attn.heads if first.attn is not None else 0
    activation = first.ffn.activation if first.ffn is not None else "—"
    assert re.search(rf"^\s+1\s+{heads}\s+\d+\s+{activation}\s", text, re.M), text
    assert f"tokens          {op.layout.length} in the input sequence" in text
    for block in op.layout.blocks:
        assert re.search(rf"^\s+{block.name}\s+.*{block.role}\s+tokens", text, re.M)


def test_describe_a_u_checkpoint(capsys):
    assert main(["describe", str(CHECKPOINTS / "universal_av.safetensors")]) == 0
    out = capsys.readouterr().out
    u = usim.load(CHECKPOINTS / "universal_av.safetensors")
    assert "UniversalSimulator" in out and "form=av" in out and "sizes           any" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s", line)]
    assert len(rows) == u.depth
    for activation in ("bilinear", "exp", "reciprocal"):
        assert activation in out
    assert f"{u.encoder.stream_width} named numbers" in out


def test_describe_reports_a_damaged_or_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["describe", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert main(["describe", str(tmp_path / "missing.safetensors")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_show_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "m.png"
    assert main(["--no-progress", "show", "matmul", "2", "--out", str(out), "--dpi", "30"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert "MatMul(n=2, m=2, p=2)" in capsys.readouterr().out


def test_show_a_checkpoint_and_u(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.png"
    assert main(["show", str(CHECKPOINTS / "transpose_4x4.safetensors"), "--out", str(out), "--dpi", "30"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    out = tmp_path / "u.png"
    assert main(["show", "u", "2", "--heads", "2", "--out", str(out), "--dpi", "30"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_show_errors_are_clear(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["show", "nosuchop", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown operation 'nosuchop'" in capsys.readouterr().err
    assert main(["show", "transpose", "1", "2", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "at most 2 sizes" in capsys.readouterr().err
    assert main(["show", "matmul", "7", "--out", str(tmp_path / "x.png")]) == 2
    assert "147 tokens" in capsys.readouterr().err


def test_sizes_and_layers_parsing():
    assert build_op("matmul", [4]).args == {"n": 4, "m": 4, "p": 4}
    assert build_op("MatMul", [2, 3]).args == {"n": 2, "m": 3, "p": 3}
    assert build_op("transpose", []).args == {"n": 3, "m": 3}
    assert build_op("u", [2, 3], heads=2).args["heads"] == 2
    assert build_op("groupsort", [2, 4], group_size=2).args["group_size"] == 2
    assert parse_layers(None) is None
    assert parse_layers("1-3,7") == [0, 1, 2, 6]
    with pytest.raises(ValueError, match="from 1"):
        parse_layers("0-2")
    with pytest.raises(ValueError, match="1-5"):
        parse_layers("a")


def test_bench_finds_the_repository_script():
    assert find_bench_script() == ROOT / "benchmarks" / "compare_mha.py"


def test_bench_passes_options_through(tmp_path, capfd):
    script = tmp_path / "fake_bench.py"
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    assert main(["bench", "--script", str(script), "--device", "cpu", "--quick", "--orders", "2"]) == 3
    assert "ARGS ['--device', 'cpu', '--quick', '--orders', '2']" in capfd.readouterr().out


def test_bench_without_its_script_says_where_it_looked(tmp_path, capsys):
    assert main(["bench", "--script", str(tmp_path / "nope.py")]) == 1
    assert "benchmark script not found" in capsys.readouterr().err


def test_unknown_options_of_other_commands_are_errors(capsys):
    with pytest.raises(SystemExit) as done:
        main(["describe", "x.safetensors", "--bogus"])
    assert done.value.code == 2


def test_demo_explains_itself_and_writes_a_picture(tmp_path, capsys, monkeypatch):
    picture = tmp_path / "demo.png"
    assert main(["demo", "--batch", "2", "--picture", str(picture), "--dpi", "30"]) == 0
    out = capsys.readouterr().out
    assert "U (the \"universal simulator\")" in out
    for jargon in ("tier", "slot", "width", "L =", "block^2"):
        assert jargon not in out, f"the demo says {jargon!r} without explaining it"
    try:
        import matplotlib
    except ImportError:
        assert "pip install -e '.[plot]'" in out
    else:
        assert matplotlib and str(picture) in out and picture.read_bytes()[:8] == PNG_SIGNATURE


def test_demo_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["demo", "--batch", "1", "--tokens", "2", "--embed-dim", "2", "--heads", "1",
                 "--picture", str(tmp_path / "demo.png")]) == 0
    assert "pip install -e '.[plot]'" in capsys.readouterr().out
    assert not (tmp_path / "demo.png").exists()


# --- sizes refused up front, messages that name the option ---------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["demo", "--batch", "100000000", "--no-picture"], r"--batch 100000000.*memory.*choose --batch at most"),
    (["demo", "--batch", "1000000", "--no-picture"], r"--batch 1000000.*(token-items|memory).*choose --batch at most"),
    (["demo", "--heads", "50000", "--embed-dim", "50000", "--no-picture"], r"--embed-dim 50000, --heads 50000.*tokens"),
    (["demo", "--tokens", "100000000", "--no-picture"], r"--tokens 100000000.*more than positions can number"),
    (["demo", "--embed-dim", "3000000", "--heads", "1", "--no-picture"], r"--embed-dim 3000000"),
    (["demo", "--tokens", "20"], r"--tokens 20: the picture.*--no-picture"),
    (["demo", "--dpi", "8000"], r"--dpi must be in 1\.\.1000, got 8000"),
    (["show", "u", "2", "--heads", "100000"], r"--heads 100000: a U figure draws at most"),
    (["show", "u", "2", "--head-dim", "100000"], r"--head-dim 100000"),
    (["show", "u", "100000", "3"], r"SIZE n 100000"),
    (["show", "inverse", "10000"], r"inverse 10000 lays out 400,000,001 tokens.*e\.g\. inverse 5\)"),
    (["show", "transpose", "2", "--dpi", "8000"], r"--dpi must be in 1\.\.1000"),
    (["show", "matmul", "2", "--layers", "1-100000000000"], r"--layers 1-100000000000: MatMul\(n=2, m=2, p=2\) has layers 1\.\.1"),
])
def test_sizes_are_refused_up_front_naming_the_option(argv, message, capsys, tmp_path, monkeypatch):
    """Each returns at once (nothing is built or allocated), and the message names the option, never
    an internal slot."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    import time

    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "positional" not in err and "Traceback" not in err
    assert time.perf_counter() - start < 10, argv
    assert not list(tmp_path.iterdir())


def test_token_counts_are_the_layouts(seed):
    """usim.budget's closed forms give every construction's sequence length exactly."""
    from usim import budget
    from usim.__main__ import OPS

    for args in [(1, 1, 1), (3, 3, 1), (2, 5, 2), (4, 3, 3)]:
        assert usim.UniversalSimulator(*args).layout.length == budget.u_tokens(*args), args
    for n, d, h, r, m, kdim, vdim in [(2, 3, 2, 2, None, None, None), (3, 5, 1, 4, None, None, None),
                                      (2, 3, 2, 2, 4, 5, 6), (3, 2, 1, 3, 2, 7, 1)]:
        u = usim.UniversalSimulator(n, d, h, head_dim=r, kv_len=m, kdim=kdim, vdim=vdim)
        assert u.layout.length == budget.u_tokens(n, d, h, r, m, kdim, vdim)
    for key, sizes in [("transpose", [2, 3]), ("matmul", [2, 3, 5]), ("softmax", [2, 3]), ("relu", [2, 3]),
                       ("maxmin", [3, 4]), ("groupsort", [3, 4]), ("inverse", [3]), ("determinant", [4])]:
        assert build_op(key, sizes).layout.length == budget.op_tokens(OPS[key][0], sizes), key
    with pytest.raises(ValueError, match=r"n=100000, d=100000, heads=1 would lay out .* tokens, more than positions"):
        usim.UniversalSimulator(100000, 100000)


def test_show_hints_name_options_that_work(tmp_path, capsys):
    """show inverse 6 is too many tokens (the hint names a size that fits); inverse 5 is too deep and
    its hint, --layers 1-24, draws it."""
    pytest.importorskip("matplotlib")
    assert main(["show", "inverse", "6", "--out", str(tmp_path / "i.png")]) == 2
    hint = re.search(r"e\.g\. (inverse \d+)", capsys.readouterr().err).group(1)
    assert main(["show", *hint.split(), "--out", str(tmp_path / "i.png")]) == 2
    layers = re.search(r"(--layers \S+) on the command line", capsys.readouterr().err).group(1)
    assert main(["show", *hint.split(), *layers.split(), "--out", str(tmp_path / "i.png"), "--dpi", "20"]) == 0
    assert (tmp_path / "i.png").read_bytes()[:8] == PNG_SIGNATURE


def test_show_reports_the_path_it_writes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    for out, written in (("adir", Path("adir", "transpose.png")), ("noext", Path("noext.png")),
                         ("pic.png", Path("pic.png")), (str(tmp_path / "abs"), tmp_path / "abs.png")):
        assert main(["show", "transpose", "2", "--out", out, "--dpi", "20"]) == 0
        assert f"wrote {written} " in capsys.readouterr().out and written.read_bytes()[:8] == PNG_SIGNATURE
    assert main(["show", "transpose", "2", "--out", "nofolder/", "--dpi", "20"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_show_a_checkpoint_refuses_what_it_fixes_and_a_large_drop_in_says_what_to_draw(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    checkpoint = str(CHECKPOINTS / "transpose_4x4.safetensors")
    for option in (["--heads", "3"], ["--head-dim", "2"], ["--group-size", "2"], ["4"]):
        assert main(["show", checkpoint, *option, "--out", str(tmp_path / "x.png")]) == 2
        assert "fixes its sizes: drop" in capsys.readouterr().err
    drop_in = usim.SimulatedMultiheadAttention.from_torch(__import__("torch").nn.MultiheadAttention(32, 4), seq_len=8)
    usim.save(drop_in, tmp_path / "big.safetensors")
    assert main(["show", str(tmp_path / "big.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    suggested = re.search(r"`python -m usim (show u [^`]+)`", err).group(1).split()
    assert "describe" in err and not (tmp_path / "x.png").exists()
    assert main([*suggested, "--out", str(tmp_path / "x.png"), "--dpi", "20"]) == 0


def test_describe_refuses_folders_and_fifos_at_once(tmp_path, capsys):
    import os
    import time

    assert main(["describe", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    start = time.perf_counter()
    assert main(["describe", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err and time.perf_counter() - start < 5


def test_no_progress_after_the_command_too(tmp_path):
    from usim.progress import progress_enabled

    assert main(["describe", str(CHECKPOINTS / "transpose_4x4.safetensors"), "--no-progress"]) == 0
    assert not progress_enabled()
    args = make_parser().parse_args(["--no-progress", "describe", "x"])
    assert args.no_progress  # before the command, as before
    assert not hasattr(make_parser().parse_args(["describe", "x"]), "no_progress") or \
        not make_parser().parse_args(["describe", "x"]).no_progress


def test_scale_benchmark_help_names_a_valid_case():
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    examples = re.findall(r"--cases ([\w-]+)", done.stdout)
    cases = re.search(r"--cases \[\{([^}]*)\}", done.stdout)
    assert examples and cases, done.stdout
    assert all(e in cases.group(1).split(",") for e in examples), (examples, cases.group(1))
