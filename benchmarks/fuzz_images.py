"""Fuzzing the runtime's image loading: seeded mutations of small valid images through `preprocess`.

Seeds are small valid JPEG (baseline and progressive), PNG, GIF, WebP and TIFF (8- and 16-bit)
files made here; each case applies one seeded mutation (bit flips, truncation, byte insertion
or deletion, a header field edit: an image dimension or a length set to an edge value), writes
the bytes to a file and calls `flowae.runtime.preprocess.preprocess` on it. Every outcome must
be a float32 (3, S, S) array or an ImageError whose message is one line naming the file; any
other exception, a multi-line message, a case over --case-timeout-s or a decompression-bomb
warning (Python would print it) is a failure. With --big-jpeg WxH it also writes a valid
camera-size JPEG of one grey (a few MB even at 200 Mpx) and reports the peak memory of a fresh
process that runs `preprocess` on it. Prints counts per outcome, per seed and per mutation and
writes them as JSON to --out; exits 1 when any case failed. The test suite runs a short corpus
of the same generator (tests/runtime/test_runtime_fuzz.py) and the same memory probe
(tests/runtime/test_runtime_images.py). Imports numpy, Pillow, click and the runtime.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from PIL import Image

from flowae.runtime.errors import ImageError
from flowae.runtime.files import write_text_atomic
from flowae.runtime.preprocess import preprocess

DEFAULT_CASES = 20_000
DEFAULT_CASE_TIMEOUT_S = 20.0  # a case over this is a hang: far above the slowest seen
EDGE_VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0xFFFFFFFF)
MUTATIONS = ("bit_flips", "truncate", "insert", "delete", "header_field")
OK, REFUSED = "ok", "ImageError"


def seed_images(seed: int = 0) -> dict[str, bytes]:
    """Small valid files, one per format and variant: a seeded colour gradient with noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 48)[None, :, None] * np.array([1.0, 0.5, 0.2])
    pixels = np.clip(ramp + rng.normal(0, 20, (32, 48, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    files = {}

    def save(name: str, picture: Image.Image, fmt: str, **options) -> None:
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        files[name] = buffer.getvalue()

    save("jpeg", image, "JPEG", quality=85)
    save("jpeg-progressive", image, "JPEG", quality=85, progressive=True)
    save("png", image, "PNG")
    save("gif", image.quantize(32), "GIF")
    save("webp", image, "WEBP", quality=80)
    save("tiff", image, "TIFF")
    save("tiff-16bit", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "TIFF")
    return files


def dimension_offsets(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the width/height fields a format's header holds."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return [(16, ">I"), (20, ">I")]
    if data[:6] in (b"GIF87a", b"GIF89a"):
        found = [(6, "<H"), (8, "<H")]
        descriptor = data.find(b",", 13)
        return found + ([(descriptor + 5, "<H"), (descriptor + 7, "<H")] if descriptor > 0
                        else [])
    if data[:2] == b"\xff\xd8":
        frames = [data.find(marker) for marker in (b"\xff\xc0", b"\xff\xc2")]
        frame = max(frames)
        return [(frame + 5, ">H"), (frame + 7, ">H")] if frame > 0 else []
    if data[:2] in (b"II", b"MM"):
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack_from(order + "I", data, 4)[0]
        found = []
        for entry in range(struct.unpack_from(order + "H", data, ifd)[0]):
            at = ifd + 2 + 12 * entry
            tag, kind = struct.unpack_from(order + "HH", data, at)
            if tag in (256, 257, 273, 279):  # width, height, strip offsets, strip byte counts
                found.append((at + 8, order + ("H" if kind == 3 else "I")))
        return found
    if data[:4] == b"RIFF":
        return [(4, "<I"), (16, "<I"), (26, "<H"), (28, "<H")]  # sizes, VP8 frame dimensions
    return []


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """One seeded mutation of a file's bytes."""
    out = bytearray(data)
    if kind == "bit_flips":
        for _ in range(int(rng.integers(1, 9))):
            at = int(rng.integers(len(out)))
            out[at] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        del out[int(rng.integers(1, len(out))) :]
    elif kind == "insert":
        at = int(rng.integers(len(out) + 1))
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    elif kind == "delete":
        at = int(rng.integers(len(out)))
        del out[at : at + int(rng.integers(1, 65))]
    elif kind == "header_field":
        fields = dimension_offsets(data)
        if fields and rng.random() < 0.8:
            at, fmt = fields[int(rng.integers(len(fields)))]
        else:  # anywhere in the first 64 bytes, either byte order
            at, fmt = int(rng.integers(0, min(64, len(out) - 4))), rng.choice(["<I", ">I", ">H"])
        limit = 1 << (8 * struct.calcsize(fmt))
        value = int(rng.choice(EDGE_VALUES)) % limit
        struct.pack_into(fmt, out, at, value)
    else:
        raise ValueError(f"unknown mutation {kind!r}")
    return bytes(out)


def flat_jpeg(path: Path, width: int, height: int) -> Path:
    """A valid baseline YCbCr 4:4:4 JPEG of one grey (Y 141), of any size, written in a few MB.

    Hand-made Huffman tables give every block after the first the 2-bit code "DC unchanged,
    end of block", so the scan is nearly all zero bytes: a 200 Mpx file takes 2.3 MB and no
    pixel buffer ever exists here.
    """
    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    quant = segment(0xDB, bytes([0]) + bytes([1]) * 64)  # table 0, every step 1
    frame = segment(0xC0, bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big")
                    + bytes([3, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0]))
    # DC table: category 0 -> "0", category 7 -> "10". AC table: end of block -> "0".
    dc = segment(0xC4, bytes([0x00, 1, 1] + [0] * 14 + [0, 7]))
    ac = segment(0xC4, bytes([0x10, 1] + [0] * 15 + [0]))
    scan = segment(0xDA, bytes([3, 1, 0x00, 2, 0x00, 3, 0x00, 0, 63, 0]))
    blocks = -(-width // 8) * -(-height // 8)
    # First MCU: Y has DC difference +100 ("10" + 7 bits 1100100, then EOB "0"); Cb, Cr "00".
    # With three empty MCUs after it that is 32 bits; every later MCU is 6 zero bits.
    head = bytes([0b10110010, 0b00000000, 0, 0])
    tail_bits = (blocks - 4) * 6
    body = bytes(tail_bits // 8) + (bytes([0xFF >> (tail_bits % 8)]) if tail_bits % 8 else b"")
    with open(path, "wb") as out:
        for part in (b"\xff\xd8", quant, frame, dc, ac, scan, head):
            out.write(part)
        out.write(body.replace(b"\xff", b"\xff\x00"))
        out.write(b"\xff\xd9")
    return path


# Run in a fresh interpreter with warnings as errors: peak RSS before and after one preprocess.
# VmHWM is this process's own peak; ru_maxrss would also carry the parent's, kept across exec.
_MEASURE = """
import json, resource, sys, time
from flowae.runtime.preprocess import preprocess
def peak_mb():
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before_mb = peak_mb()
start = time.perf_counter()
out = preprocess(sys.argv[1], jpeg_draft=False)
seconds = time.perf_counter() - start
after_mb = peak_mb()
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype), "mean": float(out.mean()),
                  "seconds": seconds, "peak_rss_mb": after_mb, "growth_mb": after_mb - before_mb}))
"""


def measure_big_jpeg(width: int, height: int) -> dict:
    """Peak memory of `preprocess` (default budget, draft off) on a flat width x height JPEG in
    a fresh process; with the child's stderr, which must stay empty."""
    with tempfile.TemporaryDirectory(prefix="big-jpeg-") as folder:
        path = flat_jpeg(Path(folder) / "camera.jpg", width, height)
        done = subprocess.run([sys.executable, "-W", "error", "-c", _MEASURE, str(path)],
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"preprocess on a {width}x{height} JPEG failed: {done.stderr}")
        row = json.loads(done.stdout)
        row.update(width=width, height=height, megapixels=width * height / 1e6,
                   file_mb=path.stat().st_size / 1e6, stderr=done.stderr)
    return row


@dataclass(frozen=True)
class Case:
    index: int
    seed_name: str
    mutation: str
    data: bytes


def cases(count: int, seed: int) -> Iterator[Case]:
    """`count` mutated files, the same for the same seed, cycling through seeds and mutations."""
    seeds = seed_images(seed)
    names = sorted(seeds)
    rng = np.random.default_rng(seed)
    for index in range(count):
        name = names[index % len(names)]
        kind = MUTATIONS[(index // len(names)) % len(MUTATIONS)]
        yield Case(index, name, kind, mutate(seeds[name], kind, rng))


class CaseTimeout(Exception):
    """A case ran past its time limit."""


def judge(case: Case, folder: Path, timeout_s: float) -> tuple[str, str, list[str]]:
    """(outcome, message, warning categories) of one case through preprocess."""
    path = folder / f"case-{case.index}"
    path.write_bytes(case.data)

    def expire(signum, frame):
        raise CaseTimeout(f"over {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        with warnings.catch_warnings(record=True) as caught:  # this script is single-threaded
            warnings.simplefilter("always")
            try:
                out = preprocess(path)
            except ImageError as exc:
                message = str(exc)
                ok = "\n" not in message and message.startswith(f"{path}: ")
                outcome, text = (REFUSED if ok else "bad-message"), message
            except CaseTimeout as exc:
                outcome, text = "timeout", str(exc)
            except Exception as exc:  # what the fuzzing is for: anything else is a bug
                outcome, text = f"exception:{type(exc).__name__}", str(exc)
            else:
                good = out.shape == (3, 100, 100) and out.dtype == np.float32 and \
                    bool(np.isfinite(out).all())
                outcome, text = (OK if good else "bad-output"), f"{out.shape} {out.dtype}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        path.unlink()
    categories = sorted({w.category.__name__ for w in caught})
    if "DecompressionBombWarning" in categories:  # Python would have printed it
        outcome, text = "bomb-warning", str(caught[0].message)
    return outcome, text, categories


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    by_seed: dict = field(default_factory=dict)
    by_mutation: dict = field(default_factory=dict)
    warnings: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k not in (OK, REFUSED))

    def to_dict(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 2), "failed": self.failed,
                "outcomes": dict(self.outcomes), "by_seed": self.by_seed,
                "by_mutation": self.by_mutation, "warnings": dict(self.warnings),
                "failures": self.failures}


def run_fuzz(count: int, seed: int, timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
             progress: Callable[[int], None] | None = None) -> Report:
    """Judge `count` cases; counts per outcome, seed and mutation; the first 50 failures."""
    report = Report()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-images-") as folder:
        for case in cases(count, seed):
            outcome, message, categories = judge(case, Path(folder), timeout_s)
            report.cases += 1
            report.outcomes[outcome] += 1
            report.by_seed.setdefault(case.seed_name, Counter())[outcome] += 1
            report.by_mutation.setdefault(case.mutation, Counter())[outcome] += 1
            report.warnings.update(categories)
            if outcome not in (OK, REFUSED) and len(report.failures) < 50:
                report.failures.append({"index": case.index, "seed_name": case.seed_name,
                                        "mutation": case.mutation, "outcome": outcome,
                                        "message": message[:300]})
            if progress is not None:
                progress(report.cases)
    report.seconds = time.perf_counter() - start
    return report


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--cases", "count", type=click.IntRange(min=1), default=DEFAULT_CASES,
              show_default=True, help="Mutated files to try.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the seed images and the mutations (the same seed, the same cases).")
@click.option("--case-timeout-s", type=click.FloatRange(min=0.1),
              default=DEFAULT_CASE_TIMEOUT_S, show_default=True,
              help="A case running longer counts as a hang.")
@click.option("--big-jpeg", "big_jpegs", multiple=True, metavar="WxH",
              help="Also measure preprocess's peak memory on a WxH JPEG (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the counts as JSON here.")
def main(count: int, seed: int, case_timeout_s: float, big_jpegs: tuple[str, ...],
         out: Path | None) -> None:
    try:
        sizes = [tuple(int(side) for side in text.lower().split("x")) for text in big_jpegs]
    except ValueError:
        raise click.BadParameter(f"expected WxH, got {big_jpegs}", param_hint="--big-jpeg"
                                 ) from None
    memory = [measure_big_jpeg(width, height) for width, height in sizes]
    for row in memory:
        click.echo(f"{row['width']}x{row['height']} JPEG ({row['megapixels']:.0f} Mpx, "
                   f"{row['file_mb']:.1f} MB file): preprocess {row['seconds']:.2f} s, peak RSS "
                   f"{row['peak_rss_mb']:.0f} MB (+{row['growth_mb']:.0f} MB over the imports)")
    report = run_fuzz(count, seed, case_timeout_s)
    summary = report.to_dict() | {"big_jpegs": memory}
    click.echo(f"{report.cases} cases in {report.seconds:.1f} s "
               f"({1e3 * report.seconds / report.cases:.2f} ms each), seed {seed}: "
               + ", ".join(f"{k} {n}" for k, n in report.outcomes.most_common()))
    for title, table in (("seed", report.by_seed), ("mutation", report.by_mutation)):
        for name, counts in sorted(table.items()):
            click.echo(f"  {title} {name:<18} " + ", ".join(
                f"{k} {n}" for k, n in sorted(counts.items())))
    if report.warnings:
        click.echo("  warnings: " + ", ".join(f"{k} {n}" for k, n in report.warnings.items()))
    for failure in report.failures[:10]:
        click.echo(f"  FAILED {json.dumps(failure)}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(summary, indent=2) + "\n")
        click.echo(f"wrote {out}")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
