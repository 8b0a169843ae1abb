"""flowae.runtime.batch: batch inference over an image archive on Ray Data, behind `[distributed]`.

`storage` lists the inputs (local paths and URIs), `results` keeps the results folder
(resumable, written one whole part file at a time), `pipeline` runs the torch-free Predictor
in a Ray actor pool, and `cli` is `flowae-batch`. Ray and pyarrow are imported inside the
functions that need them, so importing this package costs nothing without the extra. Imports
the runtime core only (never torch or training code).
"""


def main() -> None:
    """`flowae-batch` (the console script's target); the click command lives in `cli`."""
    from flowae.runtime.batch.cli import main as cli_main

    cli_main()
