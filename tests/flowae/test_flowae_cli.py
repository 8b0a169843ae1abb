"""`flowae-train` through click's test runner: exit codes and one-line messages for bad input,
and a real (tiny) run stopped and resumed from the command line."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from flowae.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flowae.cli import main
from flowae.config import RECIPES, TrainConfig
from flowae.models import VARIANTS
from flowae.train import METRICS_NAME

TINY = {"trnid": 4, "valid": 2, "tstid": 2}
FAST = ["--ae-epochs", "1", "--cls-epochs", "1", "--batch-size", "4", "--device", "cpu",
        "--no-progress"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, exit_code: int) -> str:
    """The run failed with `exit_code` and a single `Error: ...` line, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit)  # click's exit, not an escaped exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_help_lists_the_registry_and_the_seed_defaults():
    result = invoke("--help")
    assert result.exit_code == 0
    text = "".join(result.output.split())  # click wraps lines wherever it likes

    def shown_default(option: str) -> str:  # the first [default: ...] after the option
        return re.search(r"\[default:([^;\]]+)", text[text.index(option):]).group(1)

    assert f"--variant[{'|'.join(VARIANTS)}]" in text
    def seed_default(option: str) -> str:  # "[default: from --recipe; seed X]" -> X
        return re.search(r"seed([^\]]+)\]", text[text.index(option):]).group(1)

    defaults = RECIPES["seed"]
    assert defaults == TrainConfig()  # the dataclass defaults are the seed recipe
    assert shown_default("--variant") == "upsample"
    assert shown_default("--recipe").startswith("seed")
    assert seed_default("--ae-epochs") == str(defaults.ae_epochs) == "100"
    assert seed_default("--cls-epochs") == str(defaults.cls_epochs) == "60"
    assert seed_default("--dec-epochs") == str(defaults.dec_epochs) == "0"
    assert seed_default("--batch-size") == str(defaults.batch_size) == "255"
    assert float(seed_default("--lr")) == defaults.lr == 1e-3
    assert shown_default("--device") == "auto"
    assert seed_default("--augment") == "no-augment"  # off in the seed recipe


@pytest.mark.parametrize(
    "args, mentions",
    [
        (["--variant", "resnet"], "--variant"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--lr", "nan"], "not a finite number"),
        (["--lr", "inf"], "not a finite number"),
        (["--ae-epochs", "-1"], "--ae-epochs"),
        (["--cls-epochs", "two"], "--cls-epochs"),
        (["--seed", "1.5"], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--stop-after-epochs", "0"], "--stop-after-epochs"),
        (["--augment", "yes"], "unexpected extra argument"),
        (["--colour", "red"], "--colour"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path, args, mentions):
    result = invoke("--out", tmp_path / "run", "--data-root", tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert mentions in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_out_exits_2(tmp_path):
    result = invoke("--data-root", tmp_path)
    assert result.exit_code == 2
    assert "Missing option '--out'" in result.stderr


def test_paths_that_are_files_exit_2(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for args in (["--out", a_file], ["--out", tmp_path / "run", "--data-root", a_file]):
        result = invoke(*args)
        assert result.exit_code == 2 and "is a file" in result.stderr


def test_missing_dataset_is_one_line_naming_folder_and_both_fixes(tmp_path):
    data_root = tmp_path / "no-flowers-here"
    result = invoke("--data-root", data_root, "--out", tmp_path / "run", *FAST)
    line = assert_one_line_error(result, 2)  # bad data is bad input, as a bad option is
    assert str(data_root) in line and "--data-root" in line and "--download" in line
    assert not (tmp_path / "run").exists()


def test_corrupt_mat_file_is_one_line_naming_folder_and_both_fixes(make_fake_root, tmp_path):
    data_root = make_fake_root(TINY)
    labels = data_root / "flowers-102" / "imagelabels.mat"
    labels.write_bytes(labels.read_bytes()[:100])
    result = invoke("--data-root", data_root, "--out", tmp_path / "run", *FAST)
    line = assert_one_line_error(result, 2)
    assert str(data_root) in line and "--data-root" in line and "--download" in line


def test_stop_resume_and_refusals_from_the_command_line(make_fake_root, tmp_path):
    data_root = make_fake_root(TINY)
    run_dir = tmp_path / "run"
    common = ["--data-root", data_root, "--out", run_dir, *FAST]

    stopped = invoke(*common, "--stop-after-epochs", "1")
    assert stopped.exit_code == 0, stopped.output
    assert stopped.stdout.strip() == ("stopped after ae 1/1, cls 0/1, dec 0/0 epochs; "
                                      "continue with --resume")
    assert load_checkpoint(run_dir)["progress"] == {"ae": 1, "cls": 0, "dec": 0}

    again = invoke(*common)
    line = assert_one_line_error(again, 1)
    assert str(run_dir) in line and "pass --resume" in line

    other_lr = invoke(*common, "--resume", "--lr", "0.01")
    assert "other training options" in assert_one_line_error(other_lr, 1)
    other_variant = invoke(*common, "--resume", "--variant", "base")
    assert "another model" in assert_one_line_error(other_variant, 1)

    finished = invoke(*common, "--resume")
    assert finished.exit_code == 0, finished.output
    summary = finished.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("upsample: test top-1 ")
    assert summary[0].endswith(f"-> {run_dir}")

    metrics = json.loads((run_dir / METRICS_NAME).read_text())
    # The flags became the TrainConfig; every option not given kept its dataclass default,
    # augmentation (off in the seed recipe) included.
    assert metrics["train_config"] == TrainConfig(ae_epochs=1, cls_epochs=1, batch_size=4,
                                                  device="cpu").to_dict()
    assert metrics["train_config"]["augment"] is False
    assert metrics["variant"] == "upsample"  # the CLI's default variant
    assert [len(metrics["history"][phase]) for phase in ("ae", "cls")] == [1, 1]
    assert f"top-1 {metrics['test']['top1']:.2f}%" in summary[0]
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["progress"] == {"ae": 1, "cls": 1, "dec": 0}


def test_version_and_short_help():
    from flowae import __version__

    version = invoke("--version")
    assert version.exit_code == 0
    assert version.output.strip() == f"flowae-train {__version__}"
    short, long = invoke("-h"), invoke("--help")
    assert short.exit_code == 0 and short.output == long.output
    assert "--version" in long.output and "-h, --help" in long.output


def test_help_and_option_errors_answer_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom flowae.cli import main\n"
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0\n"
            "assert CliRunner().invoke(main, ['-h']).exit_code == 0\n"
            "assert CliRunner().invoke(main, ['--version']).exit_code == 0\n"
            "assert CliRunner().invoke(main, ['--out', 'x', '--lr', 'fast']).exit_code == 2\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
