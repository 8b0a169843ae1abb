"""The ONNX model contract: the one place that names what crosses the torch/ONNX boundary.

Graph input/output names and layouts, the preprocessing rule (resize, crop, scaling), class
names, the metadata key and its fields, and the contract version. Training's eval transform,
export's example inputs and dynamic axes, and the runtime's preprocessing are all built from
this module. It imports the standard library only, so every part of the project may import it.
"""

from __future__ import annotations

import json
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
# Keys of ModelMetadata.extra under which export copies the training run's own test figures (%).
EXTRA_TEST_TOP1 = "test_top1"
EXTRA_TEST_TOP5 = "test_top5"
INPUT_IMAGE = "image"  # (B, 3, H, W), scaled as Preprocess says
OUTPUT_LOGITS = "logits"  # (B, NUM_CLASSES)
OUTPUT_LATENT = "latent"  # (B, C, h, w), the encoder's code
INPUT_LATENT = "latent"  # decoder input, same tensor as OUTPUT_LATENT
OUTPUT_RECONSTRUCTION = "reconstruction"  # (B, 3, H, W) in [-1, 1]
BATCH_AXIS = "batch"  # name of the dynamic first axis of every input and output


def graph_file(role: str, precision: str = "fp32") -> str:
    """File name of a graph inside a model directory: `decoder.onnx`, `decoder.int8.onnx`."""
    if role not in GRAPH_IO or precision not in PRECISIONS:
        raise ContractError(f"no graph file for role {role!r} in precision {precision!r}")
    return f"{role}.onnx" if precision == "fp32" else f"{role}.{precision}.onnx"


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
        try:
            return cls(
                image_size_px=int(data["image_size_px"]),
                resize_px=int(data["resize_px"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                resize_filter=str(data["resize_filter"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"preprocess metadata is malformed: {exc}") from exc


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
        try:
            return cls(
                role=role,
                variant=str(data["variant"]),
                preprocess=Preprocess.from_dict(data["preprocess"]),
                latent_shape=tuple(int(v) for v in data["latent_shape"]),
                class_names=tuple(str(v) for v in data["class_names"]),
                contract_version=version,
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"'{METADATA_KEY}' metadata is missing or bad: {exc}") from exc
