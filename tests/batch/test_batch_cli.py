"""`flowae-batch`: --help, --version, one-line errors, the missing extra, exit codes 0/1/2, and
sources and results given as file:// URIs (read as bytes, as object storage is)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import flowae.runtime
from flowae.runtime import __version__
from flowae.runtime.batch.cli import main
from flowae.runtime.batch.pipeline import EXTRA_HINT
from flowae.runtime.errors import ImageError
from flowae.runtime.images import load_rgb


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0 and "SOURCE..." in result.output and "RAY_ADDRESS" in result.output
    result = invoke("--version")
    assert (result.exit_code, result.output) == (0, f"flowae-batch {__version__}\n")


def test_the_console_script_target_is_the_command():
    done = subprocess.run([sys.executable, "-c", "from flowae.runtime.batch import main; main()",
                           "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, f"flowae-batch {__version__}\n")


@pytest.mark.parametrize(("args", "says"), [
    (["a.jpg"], "Missing option '--out'"),
    (["a.jpg", "--out", "r", "--actors", "0"], "'--actors'"),
    (["a.jpg", "--out", "r", "--format", "csv"], "'--format'"),
    (["--out", "r"], "give at least one SOURCE"),
])
def test_bad_options_are_one_line_and_exit_2(args, says, tmp_path):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("flowae-batch: error: ") and says in result.stderr
    assert result.stderr.endswith(" (see flowae-batch -h)\n")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_without_the_extra_one_line_names_it_and_exit_2(tmp_path, photos):
    out = tmp_path / "results"
    blocked = ("import sys; sys.modules['ray'] = None; "
               "from flowae.runtime.batch.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", blocked, str(photos[0]), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and EXTRA_HINT in done.stderr
    assert not out.exists()


def test_uris_exit_1_on_a_failed_image_and_a_rerun_skips_all(ray_session, tmp_path, photos,
                                                             broken_dir, infer_json,
                                                             monkeypatch):
    # A relative --model: the actors, whose working folder is not this one, must find it too.
    monkeypatch.chdir(Path(flowae.runtime.__file__).parent)
    model = ("--model", "models")  # the bundled model
    huge = tmp_path / "huge.png"  # 100 MP, over the pixel budget: refused before decoding
    Image.new("1", (10_000, 10_000)).save(huge)
    sources = [f"file://{photos[0].parent}/{photos[0].name[:-5]}*.jpg",  # a glob in a URI
               f"file://{broken_dir}/not_an_image.jpg", f"file://{broken_dir}/truncated.jpg",
               f"file://{huge}"]
    out = f"file://{tmp_path}/results"
    result = invoke(*sources, *model, "--out", out, "--format", "jsonl", "--actors", 2, "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["failed"] == 3 and summary["processed"] == summary["inputs"] >= 4
    (part,) = (tmp_path / "results").glob("part-*.jsonl")
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert len(rows) == summary["inputs"]
    rows_by_image = {row.pop("image"): row for row in rows}
    with pytest.raises(ImageError) as caught:
        load_rgb(huge)
    assert "over the pixel budget" in str(caught.value)
    assert rows_by_image.pop(sources[-1])["error"] == str(caught.value).replace(str(huge),
                                                                                sources[-1])
    for image, row in rows_by_image.items():
        assert image.startswith("file://")
        expected = infer_json[image.removeprefix("file://")]
        if row["error"] is not None:  # read as bytes, refused in the words used for the file
            assert row["error"] == expected["error"].replace(image.removeprefix("file://"),
                                                             image, 1)
            continue
        assert row["labels"] == [p["label"] for p in expected["top_k"]]
        assert row["probabilities"] == pytest.approx(
            [p["probability"] for p in expected["top_k"]], abs=1e-6)
    again = invoke(*sources, *model, "--out", out, "--format", "jsonl")
    assert again.exit_code == 1
    assert f"0 processed now (0 failed), {summary['inputs']} already in" in again.stdout


def test_exit_0_when_every_image_worked(batch_job, tmp_path, photos):
    out = tmp_path / "results"
    shutil.copytree(batch_job[1], out)
    result = invoke(*photos[:3], "--out", out)
    assert result.exit_code == 0, result.output
    assert "3 inputs: 0 processed now (0 failed), 3 already in" in result.stdout
