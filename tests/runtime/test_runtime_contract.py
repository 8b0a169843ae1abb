"""contract.validate, the one judge of a model's metadata: every field it checks, refused in
one line with what was expected and what was found, and the graph's own dims compared."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from flowae.runtime.contract import (
    CLASS_NAMES,
    MAX_IMAGE_SIDE_PX,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    Preprocess,
    validate,
)
from flowae.runtime.errors import ContractError

GOOD = ModelMetadata(role=ROLE_ENCODER_CLASSIFIER, variant="upsample", preprocess=Preprocess(),
                     latent_shape=(16, 22, 22))
GRAPH = {"logits_dim": 102, "latent_shape": (16, 22, 22), "image_shape": (3, 100, 100)}


def spec(**changes) -> ModelMetadata:
    return replace(GOOD, preprocess=replace(GOOD.preprocess, **changes))


def refused(metadata: ModelMetadata, **graph) -> str:
    with pytest.raises(ContractError) as caught:
        validate(metadata, **graph)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_exported_default_passes():
    validate(GOOD, **GRAPH)
    validate(GOOD, logits_dim="classes", latent_shape=("C", 22, None), image_shape=(3, "S", "S"))


@pytest.mark.parametrize("metadata, message", [
    (spec(resize_px=0), "preprocess resize_px must be an integer from 1 to 4096, got 0"),
    (spec(image_size_px=0), "image_size_px must be an integer from 1 to 4096, got 0"),
    (spec(resize_px=MAX_IMAGE_SIDE_PX + 1), "got 4097"),
    (spec(resize_px="100"), "got '100'"),
    (spec(resize_px=True), "got True"),
    (spec(resize_px=100.5), "got 100.5"),
    (spec(resize_filter="lanczos"), "unsupported resize filter 'lanczos'"),
    (spec(mean=(0.5,)), "preprocess mean must be 3 finite numbers (R, G, B), got (0.5,)"),
    (spec(mean=(0.5, 0.5, float("nan"))), "mean must be 3 finite numbers"),
    (spec(std=(0.5, 0.5, float("inf"))), "std must be 3 finite numbers"),
    (spec(std=(0.5, "0.5", 0.5)), "std must be 3 finite numbers"),
    (spec(std=(0.5, 0.0, 0.5)), "preprocess std must be > 0 in every channel"),
    (spec(std=(0.5, -0.2, 0.5)), "std must be > 0"),
    (replace(GOOD, latent_shape=(16, 22)), "latent_shape must be 3 positive integers"),
    (replace(GOOD, latent_shape=(16, 0, 22)), "latent_shape must be 3 positive integers"),
    (replace(GOOD, latent_shape=(16.0, 22, 22)), "latent_shape must be 3 positive integers"),
    (replace(GOOD, class_names=()), "class_names must be a non-empty list"),
    (replace(GOOD, class_names=CLASS_NAMES[:-1] + (7,)), "non-empty strings, found 7"),
    (replace(GOOD, class_names=CLASS_NAMES[:-1] + ("  ",)), "non-empty strings, found '  '"),
    (replace(GOOD, class_names=CLASS_NAMES[:-1] + ("rose",)), "'rose' appears more than once"),
    (replace(GOOD, variant=""), "variant must be a non-empty string"),
])
def test_bad_metadata_is_refused_in_one_line(metadata, message):
    assert message in refused(metadata, **GRAPH)


@pytest.mark.parametrize("graph, message", [
    ({"logits_dim": 5}, "graph gives 5 logits but its metadata names 102 classes"),
    ({"latent_shape": (8, 22, 22)}, "graph's latent is (8, 22, 22), its metadata says "
                                    "(16, 22, 22)"),
    ({"latent_shape": (16, 22)}, "graph's latent is (16, 22)"),
    ({"image_shape": (3, 64, 64)}, "graph's image tensor is (3, 64, 64), its metadata says "
                                   "(3, 100, 100)"),
    ({"image_shape": (1, "S", "S")}, "graph's image tensor is (1, None, None)"),
])
def test_metadata_must_fit_the_graph(graph, message):
    assert message in refused(GOOD, **graph)


def test_ten_names_for_102_logits():
    ten = replace(GOOD, class_names=CLASS_NAMES[:10])
    validate(ten)  # consistent on its own; the graph is what contradicts it
    assert refused(ten, **GRAPH) == "graph gives 102 logits but its metadata names 10 classes"


def test_resize_below_the_crop_is_allowed():
    """CenterCrop pads with zeros where the resized image is smaller than the crop, and
    runtime.preprocess does the same, so such a model is served exactly as it was trained."""
    validate(spec(resize_px=80, image_size_px=100), **GRAPH)


def test_from_json_keeps_types_for_validate_to_judge():
    data = json.loads(GOOD.to_json())
    assert ModelMetadata.from_json(json.dumps(data)) == GOOD
    data["class_names"] = list(range(102))  # once silently turned into "0", "1", ...
    with pytest.raises(ContractError, match="class_names must be non-empty strings, found 0"):
        ModelMetadata.from_json(json.dumps(data))
    data = json.loads(GOOD.to_json())
    data["preprocess"]["std"] = [0.5, 0.5, float("nan")]  # json writes NaN, Python reads it
    with pytest.raises(ContractError, match="std must be 3 finite numbers"):
        ModelMetadata.from_json(json.dumps(data))
    data = json.loads(GOOD.to_json())
    del data["latent_shape"]
    with pytest.raises(ContractError, match="'flowae' metadata has no latent_shape"):
        ModelMetadata.from_json(json.dumps(data))
    data = json.loads(GOOD.to_json())
    data["preprocess"] = [100, 100]
    with pytest.raises(ContractError, match="preprocess metadata is not a JSON object"):
        ModelMetadata.from_json(json.dumps(data))
