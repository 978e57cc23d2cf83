"""The one definition of the HDF5 feature-cache layout.

Writer, reader and ``mner inspect`` all take group names, dataset names, dtypes, shape
templates and required attributes from here, so the three cannot drift apart.

Layout (N images, S sentences; see docs/ARCHITECTURE.md for the table)::

    /image_ids (N,) str          /status (N,) str           root attrs: ROOT_ATTRS
    /<group>/done (N,) bool      /<group>/<dataset> (N, ...)  group attrs: GROUP_ATTRS
    /clip_text/keys (S,) str     /clip_text/done (S,) bool    /clip_text/sentence (S, Dc) ...

Shape templates name their symbolic dimensions with letters: ``N`` rows, ``Dr`` ResNet
channels, ``Dc`` CLIP embedding, ``Wc`` CLIP width, ``P1`` patch tokens + class token,
``O`` objects, ``O1`` objects + 1, ``Do`` region feature, ``K`` crops, ``T`` crop tokens,
``L`` OCR strings, ``E`` max entities per sentence. Per-row tensors are chunked one row
per chunk, so reading one image touches one chunk per dataset.

Text read from images (``tags``, ``ocr``, ``caption``) is stored as variable-length
UTF-8 strings (:data:`STR_DTYPE`): fixed slots per image (``O`` tags, ``L`` OCR strings)
padded with ``""`` behind a ``count``, like the objects. HDF5 allows no filters on
variable-length data, so these datasets carry no fletcher32 chunk checksum; the content
checksums recorded at completion (``mner inspect --verify``) cover them.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

#: Bumped whenever a dataset, dtype or required attribute changes meaning.
SCHEMA_VERSION = 1

#: Variable-length UTF-8 strings (ids, statuses, keys).
STR_DTYPE = h5py.string_dtype(encoding="utf-8")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a feature group.

    Attributes:
        name: Dataset name inside its group.
        dtype: Stored numpy dtype.
        shape: Shape template; the first entry is always the row dimension (``N`` or ``S``),
            the rest are ints or symbolic dimension names filled from the group's ``dims``.
        doc: One line for ``mner inspect`` and the docs.
    """

    name: str
    dtype: np.dtype
    shape: tuple[str | int, ...]
    doc: str

    def concrete_shape(self, rows: int, dims: dict[str, int]) -> tuple[int, ...]:
        """The shape for ``rows`` rows with the symbolic dimensions taken from ``dims``."""
        out = [rows]
        for d in self.shape[1:]:
            out.append(d if isinstance(d, int) else int(dims[d]))
        return tuple(out)


F16, F32, I32, I8, BOOL = (np.dtype(t) for t in ("float16", "float32", "int32", "int8", "bool"))
STR = STR_DTYPE

#: Feature groups keyed by name, in extraction order. ``clip_text`` rows are sentences
#: (keyed by ``Tweet.key``), every other group's rows are images (aligned with image_ids).
GROUPS: dict[str, tuple[DatasetSpec, ...]] = {
    "resnet": (
        DatasetSpec("grid", F16, ("N", 49, "Dr"), "last conv map, 7x7 regions row-major"),
        DatasetSpec("pooled", F16, ("N", "Dr"), "global average of the grid"),
    ),
    "clip": (
        DatasetSpec("image_embed", F16, ("N", "Dc"), "projected image embedding"),
        DatasetSpec("patch_tokens", F16, ("N", "P1", "Wc"), "final-layer tokens, class first"),
    ),
    "objects": (
        DatasetSpec("boxes", F32, ("N", "O", 4), "xyxy pixels of the original image"),
        DatasetSpec("boxes_norm", F32, ("N", "O", 4), "xyxy divided by width/height"),
        DatasetSpec("scores", F32, ("N", "O"), "detector confidence, descending"),
        DatasetSpec("labels", I32, ("N", "O"), "class index into attrs class_names"),
        DatasetSpec("features", F16, ("N", "O", "Do"), "RoIAlign-pooled region features"),
        DatasetSpec("count", I32, ("N",), "valid objects per image"),
    ),
    "relations": (
        DatasetSpec("labels", I8, ("N", "O1", "O1"), "node 0 = [IMG]; 0 = no edge"),
    ),
    "crops": (
        DatasetSpec("patch_tokens", F16, ("N", "K", "T", "Wc"), "CLIP tokens of object crops"),
        DatasetSpec("boxes", F32, ("N", "K", 4), "crop boxes, xyxy pixels"),
        DatasetSpec("count", I32, ("N",), "valid crops per image"),
    ),
    "tags": (
        DatasetSpec("names", STR, ("N", "O"), "distinct object labels, best score first"),
        DatasetSpec("scores", F32, ("N", "O"), "best detection score of each label"),
        DatasetSpec("count", I32, ("N",), "valid tags per image"),
    ),
    "ocr": (
        DatasetSpec("text", STR, ("N", "L"), "recognised strings in reading order"),
        DatasetSpec("boxes", F32, ("N", "L", 4, 2), "text quadrilaterals, 4 (x, y) points in pixels"),
        DatasetSpec("scores", F32, ("N", "L"), "recognition confidence"),
        DatasetSpec("count", I32, ("N",), "valid strings per image"),
    ),
    "caption": (
        DatasetSpec("text", STR, ("N",), "generated caption (empty when none)"),
    ),
    "clip_text": (
        DatasetSpec("sentence", F16, ("S", "Dc"), "projected text embedding of the sentence"),
        DatasetSpec("entities", F16, ("S", "E", "Dc"), "gold entity spans, entities() order"),
        DatasetSpec("entity_count", I32, ("S",), "valid entities per sentence"),
    ),
}

#: Feature names accepted by ``--features``, in the order they are computed.
FEATURES: tuple[str, ...] = tuple(GROUPS)

#: Features extracted when ``--features`` is not given (the visual inputs of the heads);
#: the text-from-image features are asked for by name.
DEFAULT_FEATURES: tuple[str, ...] = ("resnet", "clip", "objects", "relations", "crops", "clip_text")

#: Groups holding text read from the images (``FeatureCache.strings``).
STRING_GROUPS: tuple[str, ...] = ("tags", "ocr", "caption")

#: The dataset of each string group that ``FeatureCache.strings`` returns.
STRING_DATASETS: dict[str, str] = {"tags": "names", "ocr": "text", "caption": "text"}

#: Groups whose rows are images (aligned with /image_ids).
IMAGE_GROUPS: tuple[str, ...] = tuple(g for g in GROUPS if g != "clip_text")

#: Attributes every cache root carries (JSON-encoded where not a scalar).
ROOT_ATTRS: tuple[str, ...] = (
    "schema_version",
    "mner_version",
    "profile",
    "seed",
    "created",
    "library_versions",
    "extract_config",
)

#: Attributes every feature group carries.
GROUP_ATTRS: tuple[str, ...] = ("model", "weights", "preprocessing", "dims")

#: Root attributes and group attributes stored as JSON text.
JSON_ATTRS: frozenset[str] = frozenset(
    {"library_versions", "extract_config", "weights", "preprocessing", "dims", "architecture",
     "class_names", "relation_names", "output_scale"}
)

#: Dataset holding the per-row resume flags in each group.
DONE = "done"
#: Dataset holding the row keys of clip_text.
TEXT_KEYS = "keys"


def spec(name: str) -> DatasetSpec:
    """The spec of ``"group/dataset"``.

    Raises:
        KeyError: If the name is not part of the schema.
    """
    group, _, ds = name.partition("/")
    for s in GROUPS.get(group, ()):
        if s.name == ds:
            return s
    raise KeyError(name)


def all_dataset_names() -> list[str]:
    """Every ``"group/dataset"`` name the schema defines (excluding done flags and keys)."""
    return [f"{g}/{s.name}" for g, specs in GROUPS.items() for s in specs]
