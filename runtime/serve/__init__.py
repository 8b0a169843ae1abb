"""flowae.runtime.serve: `flowae-serve`, an HTTP API and a web page over the device runtime.

`app` builds the Starlette application (routes, limits, access log, model files for the
browser; uploads are decoded by `runtime.images.load_rgb_bytes`, under the same rules as
files), `batching` groups concurrent requests into one model call, `openapi` describes the
API, `cli` is the command, and `static/` holds the page (HTML, CSS, JS and the pinned
onnxruntime-web files that `npm ci` in `web/` copies there). The package may import the
runtime core, Starlette and uvicorn (the `[serve]` extra); this file imports nothing, so
`flowae-serve` can say which extra is missing instead of failing on import.
"""
