"""The OpenAPI 3.1 description of flowae-serve's API, served at /openapi.json.

Written by hand: six routes do not need a schema generator, and writing it out keeps the
documented error codes next to each route. Standard library only.
"""

from __future__ import annotations

_ERROR = {"$ref": "#/components/schemas/Error"}
_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
            "required": ["file"]}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_TOP_K = {"name": "top_k", "in": "query", "required": False,
          "schema": {"type": "integer", "minimum": 1, "default": 5},
          "description": "How many classes to return, most probable first."}
_IMAGE_ERRORS = {
    "400": "Empty body, malformed form, bad top_k or Content-Length (ASCII digits only)",
    "408": "The request body did not all arrive within --body-timeout-s",
    "413": "Upload over --max-upload-mb (Content-Length or counted bytes)",
    "415": "Content-Type is not multipart/form-data, image/* or application/octet-stream",
    "422": "Not an image, truncated, over --max-pixels, too small or too elongated",
    "503": "Too many images waiting (--max-queue) or shutting down, see Retry-After; or "
           "too many open connections (--max-connections)",
    "504": "No answer within --timeout-s",
}


def _errors(codes: dict[str, str]) -> dict:
    return {code: {"description": text, "content": {"application/json": {"schema": _ERROR}}}
            for code, text in codes.items()}


def _json(description: str, schema: dict | None = None) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def openapi_document(version: str) -> dict:
    """The API description for this flowae version."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "flowae-serve", "version": version,
                 "description": "Oxford 102 flower names and autoencoder reconstructions "
                                "from ONNX graphs, micro-batched."},
        "paths": {
            "/v1/classify": {"post": {
                "summary": "Top-k flower names for one image",
                "parameters": [_TOP_K], "requestBody": _IMAGE_BODY,
                "responses": {"200": _json("The object `flowae-infer --json` prints",
                                           {"$ref": "#/components/schemas/Classification"}),
                              **_errors(_IMAGE_ERRORS)}}},
            "/v1/reconstruct": {"post": {
                "summary": "The model's input crop beside the autoencoder's reconstruction",
                "requestBody": _IMAGE_BODY,
                "responses": {"200": {"description": "PNG, 2S x S: input crop | reconstruction",
                                      "content": {"image/png": {}}},
                              **_errors({**_IMAGE_ERRORS, "404": "The model has no decoder"})}}},
            "/v1/model": {"get": {
                "summary": "Model metadata, serving settings and graph-file URLs",
                "responses": {"200": _json("Classes, preprocessing, precision, provider, "
                                           "versions, graphs by precision")}}},
            "/v1/model/files/{name}": {"get": {
                "summary": "A graph file listed in the model's manifest",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The ONNX/ORT file",
                                      "content": {"application/octet-stream": {}}},
                              **_errors({"404": "Not a graph file of this model"})}}},
            "/v1/stats": {"get": {
                "summary": "Batching and request counters since start",
                "responses": {"200": _json("batches, images, batch_sizes, waiting, ...")}}},
            "/healthz": {"get": {"summary": "Liveness",
                                 "responses": {"200": _json("{\"status\": \"ok\"}")}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}},
                      "required": ["error"]},
            "Classification": {"type": "object", "required": ["image", "top_k"], "properties": {
                "image": {"type": "string"},
                "top_k": {"type": "array", "items": {"type": "object", "properties": {
                    "label": {"type": "integer"}, "class_name": {"type": "string"},
                    "probability": {"type": "number"}}}}}},
        }},
    }
