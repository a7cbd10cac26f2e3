"""Named BiT variants and the pretrained configs of the authors' released checkpoints.

Each entry says what the network is (depths, width), what its released checkpoint holds
(upstream data, head size, resolution) and where to fetch it. The base address of the download
comes from ``$BIT_MODELS_URL`` when set, so a mirror or a test server can stand in.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from .. import hyperrule
from .resnetv2 import Architecture

DEFAULT_BASE_URL = "https://storage.googleapis.com/bit_models/"
BASE_URL_ENV = "BIT_MODELS_URL"

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
RELEASED = ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))
UPSTREAM = {"S": ("ILSVRC-2012", 1000), "M": ("ImageNet-21k", 21843)}  # 21k is multi-label: a sigmoid head
VTAB_ARCHS = ((50, 1), (101, 1), (50, 3), (101, 3), (152, 4))  # BiT-M fine-tuned on VTAB-1k, runs 0-2 each
VTAB_TASKS = {  # the release's task names: (classes, side of the source images, as HyperRule sizes them)
    "caltech101": (102, 224), "cifar100": (100, 32), "dtd": (47, 224), "oxford_flowers102": (102, 224),
    "oxford_iiit_pet": (37, 224), "sun397": (397, 224), "svhn": (10, 32), "patch_camelyon": (2, 96),
    "eurosat": (10, 64), "resisc45": (45, 256), "diabetic_retinopathy": (5, 224), "clevr-count": (8, 224),
    "clevr-distance": (6, 224), "dmlab": (6, 224), "kitti-distance": (4, 224), "dsprites-xpos": (16, 64),
    "dsprites-orientation": (16, 64), "smallnorb-azimuth": (18, 96), "smallnorb-elevation": (9, 96),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: Architecture
    num_classes: int  # head size of the released checkpoint (or the default head of a random model)
    resolution: int  # input side the checkpoint was trained / is evaluated at
    upstream: str | None = None  # data the released weights were trained on; None: no released weights
    file: str | None = None  # path under the base address
    sha256: str | None = None  # None: unknown, the download is not verified
    description: str = ""
    bundled: str | None = None  # weights shipped inside the package (bigtransfer/weights/NAME), no download
    multi_label: bool = False  # the released head was trained with sigmoid cross-entropy (multi-label upstream data)

    @property
    def vtab_run(self) -> bool:
        """One of the release's 285 VTAB-1k fine-tuned runs (listed apart: they would bury the rest)."""
        return (self.file or "").startswith("vtab/")

    @property
    def url(self) -> str | None:
        if self.file is None:
            return None
        base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        return base.rstrip("/") + "/" + self.file


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, overwrite: bool = False) -> ModelSpec:
    """Add a variant (your own mirror, checkpoint or size) so that `create_model(spec.name)` finds it."""
    key = spec.name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[key] = spec
    return spec


def list_models() -> list[str]:
    """Names of all registered variants, in registry order."""
    return [spec.name for spec in _REGISTRY.values()]


def get_model_spec(name: str) -> ModelSpec:
    """Look a variant up by name (case-insensitive); unknown names get the closest matches suggested."""
    spec = _REGISTRY.get(name.lower())
    if spec is None:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} `bit models` lists them all.")
    return spec


def _arch(depth: int, width: float) -> Architecture:
    return Architecture(depths=DEPTHS[depth], width=width)


def _register_released() -> None:
    for tier, (data, head) in UPSTREAM.items():
        for depth, width in RELEASED:
            name = f"BiT-{tier}-R{depth}x{width}"
            register_model(ModelSpec(name, _arch(depth, width), head, 224, data, f"{name}.npz",
                                     description=f"upstream {data} weights", multi_label=tier == "M"))
    for depth, width in RELEASED:
        # timm evaluates these at 448 px (480 for R152x4, which the paper fine-tuned at 480)
        name = f"BiT-M-R{depth}x{width}-ILSVRC2012"
        register_model(ModelSpec(name, _arch(depth, width), 1000, 480 if depth == 152 and width == 4 else 448,
                                 "ImageNet-21k -> ILSVRC-2012", f"{name}.npz",
                                 description="BiT-M fine-tuned on ILSVRC-2012"))
    for depth, width in VTAB_ARCHS:
        for task, (classes, side) in VTAB_TASKS.items():
            crop = hyperrule.resolution((side, side))[1]  # the authors do not say; the rule's side for the task
            for run in range(3):
                name = f"BiT-M-R{depth}x{width}-run{run}-{task}"
                register_model(ModelSpec(name, _arch(depth, width), classes, crop, "ImageNet-21k -> VTAB-1k",
                                         f"vtab/{name}.npz", description=f"BiT-M fine-tuned on VTAB-1k {task}"))
    for res in (224, 160):
        register_model(ModelSpec(f"BiT-R50x1-distilled-{res}", _arch(50, 1), 1000, res,
                                 "ILSVRC-2012 (distilled)", f"distill/R50x1_{res}.npz",
                                 description="student distilled from BiT-M-R152x2 (arXiv 2106.05237)"))
    for res in (224, 384):
        register_model(ModelSpec(f"BiT-M-R152x2-teacher-{res}", _arch(152, 2), 1000, res,
                                 "ImageNet-21k -> ILSVRC-2012", f"distill/R152x2_T_{res}.npz",
                                 description="distillation teacher"))


def _register_small() -> None:
    """Small random-init variants for CPU work and tests (no released weights), and the embedded
    default: BiT-R14x0.25 pre-trained by this package on generated glyphs (see weights/*.json)."""
    for depths, width in (((1, 1, 1, 1), 0.25), ((2, 2, 2, 2), 0.5), ((3, 4, 6, 3), 0.5)):
        arch = Architecture(depths=depths, width=width)
        register_model(ModelSpec(f"BiT-{arch.name}", arch, 1000, 128,
                                 description="small variant for CPU work and tests"))
    register_model(ModelSpec(DEMO_MODEL, Architecture((1, 1, 1, 1), 0.25), 1064, 32,
                             "glyphs (generated, 1,064 classes)",
                             description="embedded default, trained by `bit pretrain` on rendered glyphs",
                             bundled=f"{DEMO_MODEL}.safetensors"))


DEMO_MODEL = "BiT-R14x0.25-glyphs"


_register_released()
_register_small()
