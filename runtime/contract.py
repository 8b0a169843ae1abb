"""The ONNX model contract: the one place that names what crosses the torch/ONNX boundary.

Graph input/output names and layouts, the preprocessing rule (resize, crop, scaling), class
names, the metadata key and its fields, and the contract version. Training's eval transform,
export's example inputs and dynamic axes, and the runtime's preprocessing are all built from
this module. It imports the standard library only, so every part of the project may import it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from flowae.runtime.errors import ContractError

# Bumped whenever a change here would make an older runtime misread a newer model.
CONTRACT_VERSION = 1

# Key of the single JSON document that every exported graph carries in metadata_props.
METADATA_KEY = "flowae"

# Graph roles and their tensor names. Layout is NCHW float32 everywhere.
ROLE_ENCODER_CLASSIFIER = "encoder_classifier"
ROLE_DECODER = "decoder"
# Weight precisions an export may write; fp32 is the reference every other one is checked on.
PRECISIONS = ("fp32", "int8", "fp16")
MANIFEST_NAME = "manifest.json"  # export's report in a model directory (see flowae.export)
MANIFEST_RECOMMENDED = "recommended_precision"  # manifest key: the precision to serve by default
# manifest key: {provider family ("cpu", "cuda", "tensorrt", ...): precision to serve there}
MANIFEST_RECOMMENDED_BY_PROVIDER = "recommended_precision_by_provider"
MANIFEST_FILES = "files"  # manifest key: {file name: {"sha256": hex, "size_bytes": int, ...}}
# Serialisations a graph may be written in: ONNX protobuf, or onnxruntime's own ORT format.
GRAPH_FORMATS = ("onnx", "ort")
# Keys of ModelMetadata.extra under which export copies the training run's own test figures (%).
EXTRA_TEST_TOP1 = "test_top1"
EXTRA_TEST_TOP5 = "test_top5"
INPUT_IMAGE = "image"  # (B, 3, H, W), scaled as Preprocess says
OUTPUT_LOGITS = "logits"  # (B, NUM_CLASSES)
OUTPUT_LATENT = "latent"  # (B, C, h, w), the encoder's code
INPUT_LATENT = "latent"  # decoder input, same tensor as OUTPUT_LATENT
OUTPUT_RECONSTRUCTION = "reconstruction"  # (B, 3, H, W) in [-1, 1]
BATCH_AXIS = "batch"  # name of the dynamic first axis of every input and output


def graph_file(role: str, precision: str = "fp32", fmt: str = "onnx") -> str:
    """File name of a graph inside a model directory: `decoder.onnx`, `decoder.int8.onnx`,
    `decoder.int8.ort`."""
    if role not in GRAPH_IO or precision not in PRECISIONS or fmt not in GRAPH_FORMATS:
        raise ContractError(f"no graph file for role {role!r} in precision {precision!r} "
                            f"and format {fmt!r}")
    return f"{role}.{fmt}" if precision == "fp32" else f"{role}.{precision}.{fmt}"


GRAPH_IO = {
    ROLE_ENCODER_CLASSIFIER: ((INPUT_IMAGE,), (OUTPUT_LOGITS, OUTPUT_LATENT)),
    ROLE_DECODER: ((INPUT_LATENT,), (OUTPUT_RECONSTRUCTION,)),
}

# Oxford 102 Flowers class names, in torchvision's Flowers102.classes order (label 0..101).
CLASS_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster",
    "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip",
    "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia?", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove",
    "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)

# How every input image becomes a tensor, in this order:
#  1. convert to RGB (see runtime.preprocess for each PIL mode), EXIF orientation applied;
#  2. resize so the shorter side is `resize_px` (PIL bilinear with antialiasing, which is what
#     torchvision's Resize does on PIL images), the longer side int(long * resize_px / short);
#  3. center-crop `image_size_px` square, top/left offsets int(round((size - crop) / 2));
#  4. scale to float32 in [0, 1] (divide by 255), then (x - mean) / std per channel.
RESIZE_FILTER = "bilinear"
DEFAULT_IMAGE_SIZE_PX = 100
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # with DEFAULT_STD: [0, 1] -> [-1, 1], the decoder's Tanh range
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing rule a model was trained with; carried in each graph's metadata."""

    image_size_px: int = DEFAULT_IMAGE_SIZE_PX  # side of the square the model sees
    resize_px: int = DEFAULT_IMAGE_SIZE_PX  # shorter side after resizing, before the crop
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    resize_filter: str = RESIZE_FILTER

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        """The rule as written, types unchanged (lists become tuples); `validate` judges it."""
        if not isinstance(data, dict):
            raise ContractError(f"preprocess metadata is not a JSON object: {data!r:.60}")
        try:
            return cls(
                image_size_px=data["image_size_px"],
                resize_px=data["resize_px"],
                mean=_as_tuple(data["mean"]),
                std=_as_tuple(data["std"]),
                resize_filter=data["resize_filter"],
            )
        except KeyError as exc:
            raise ContractError(f"preprocess metadata has no {exc}") from exc


def _as_tuple(value):
    return tuple(value) if isinstance(value, list | tuple) else value


@dataclass(frozen=True)
class ModelMetadata:
    """What an exported graph says about itself (JSON under METADATA_KEY)."""

    role: str  # one of GRAPH_IO's keys
    variant: str  # registry name of the model variant
    preprocess: Preprocess
    latent_shape: tuple[int, int, int]  # (C, h, w) of the encoder's code
    class_names: tuple[str, ...] = CLASS_NAMES
    contract_version: int = CONTRACT_VERSION
    extra: dict = field(default_factory=dict)  # provenance: accuracy, sha256, versions, time

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse and `validate` the metadata document; ContractError (one line) if it is bad."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"'{METADATA_KEY}' metadata is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ContractError(f"'{METADATA_KEY}' metadata is not a JSON object")
        version = data.get("contract_version")
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"model has contract version {version!r}, this runtime reads {CONTRACT_VERSION}"
            )
        role = data.get("role")
        if role not in GRAPH_IO:
            raise ContractError(f"unknown graph role {role!r}; expected one of {sorted(GRAPH_IO)}")
        missing = [key for key in ("variant", "preprocess", "latent_shape", "class_names")
                   if key not in data]
        if missing:
            raise ContractError(f"'{METADATA_KEY}' metadata has no {', '.join(missing)}")
        extra = data.get("extra", {})
        metadata = cls(
            role=role,
            variant=data["variant"],
            preprocess=Preprocess.from_dict(data["preprocess"]),
            latent_shape=_as_tuple(data["latent_shape"]),
            class_names=_as_tuple(data["class_names"]),
            contract_version=version,
            extra=dict(extra) if isinstance(extra, dict) else {},
        )
        validate(metadata)
        return metadata


# Limits of `validate`. A side above MAX_IMAGE_SIDE_PX is no model of this project (they are
# 100 px) and would make every batch gigabytes; the limit turns a typo into an error.
MAX_IMAGE_SIDE_PX = 4096
RESIZE_FILTERS = (RESIZE_FILTER,)  # the filters runtime.preprocess implements


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _static(dims) -> tuple:
    """A graph's declared dims with symbolic ones (names, None) kept as None."""
    return tuple(d if _is_int(d) else None for d in dims)


def _differs(found, expected) -> bool:
    found = _static(found)
    return len(found) != len(expected) or any(
        f is not None and f != e for f, e in zip(found, expected, strict=True))


def validate(
    metadata: ModelMetadata,
    *,
    logits_dim: int | str | None = None,
    latent_shape: Sequence | None = None,
    image_shape: Sequence | None = None,
) -> None:
    """Refuse, with one ContractError line, metadata this runtime cannot serve correctly.

    The keywords are what the graph itself declares (batch axis left out; symbolic dims are
    not compared): the classifier's number of logits, the latent's (C, h, w) and the image's
    (3, S, S). Checks: class names (non-empty, distinct strings, as many as logits), latent
    shape (3 positive ints), the preprocessing rule (sides 1..MAX_IMAGE_SIDE_PX, a known
    resize filter, mean and std of 3 finite numbers, std > 0), and the graph's own dims.

    resize_px below image_size_px is allowed: the crop rule pads with zeros as torchvision's
    CenterCrop does (runtime.preprocess follows it), so such a model is served as trained.
    Duplicate class names are refused: an answer naming a class must name one label.
    """
    spec = metadata.preprocess
    for name in ("image_size_px", "resize_px"):
        value = getattr(spec, name)
        if not _is_int(value) or not 1 <= value <= MAX_IMAGE_SIDE_PX:
            raise ContractError(f"preprocess {name} must be an integer from 1 to "
                                f"{MAX_IMAGE_SIDE_PX}, got {value!r}")
    if spec.resize_filter not in RESIZE_FILTERS:
        raise ContractError(f"unsupported resize filter {spec.resize_filter!r}; this runtime "
                            f"implements {', '.join(RESIZE_FILTERS)}")
    for name in ("mean", "std"):
        value = getattr(spec, name)
        if not (isinstance(value, tuple) and len(value) == 3 and all(map(_is_number, value))):
            raise ContractError(f"preprocess {name} must be 3 finite numbers (R, G, B), "
                                f"got {value!r:.80}")
    if any(v <= 0 for v in spec.std):
        raise ContractError(f"preprocess std must be > 0 in every channel, got {spec.std!r}")
    latent = metadata.latent_shape
    if not (isinstance(latent, tuple) and len(latent) == 3
            and all(_is_int(v) and v > 0 for v in latent)):
        raise ContractError(f"latent_shape must be 3 positive integers (C, h, w), "
                            f"got {latent!r:.80}")
    names = metadata.class_names
    if not isinstance(names, tuple) or not names:
        raise ContractError(f"class_names must be a non-empty list, got {names!r:.80}")
    bad = next((n for n in names if not isinstance(n, str) or not n.strip()), None)
    if bad is not None:
        raise ContractError(f"class_names must be non-empty strings, found {bad!r:.60}")
    if len(set(names)) != len(names):
        seen = set()
        twice = next(n for n in names if n in seen or seen.add(n))
        raise ContractError(f"class name {twice!r} appears more than once")
    if not isinstance(metadata.variant, str) or not metadata.variant:
        raise ContractError(f"variant must be a non-empty string, got {metadata.variant!r:.60}")
    if _is_int(logits_dim) and logits_dim != len(names):
        raise ContractError(f"graph gives {logits_dim} logits but its metadata names "
                            f"{len(names)} classes")
    if latent_shape is not None and _differs(latent_shape, latent):
        raise ContractError(f"graph's latent is {_static(latent_shape)}, its metadata says "
                            f"{latent}")
    side = spec.image_size_px
    if image_shape is not None and _differs(image_shape, (3, side, side)):
        raise ContractError(f"graph's image tensor is {_static(image_shape)}, its metadata "
                            f"says {(3, side, side)}")
