"""`create_model`: a registered variant, random or with weights from the registry or a file."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .registry import get_model_spec
from .resnetv2 import ResNetV2

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint

log = logging.getLogger("bigtransfer")


def create_model(name: str, num_classes: int | None = None,
                 pretrained: bool | str | os.PathLike | Checkpoint = False, zero_head: bool = True) -> ResNetV2:
    """Build the BiT variant `name`.

    pretrained: False (random init), True (the registry's released checkpoint, downloaded into the
    cache), or a path to a checkpoint in any supported format (or one already read). num_classes: None keeps the
    checkpoint's head (the registry's head size for random models); another size gets a new head,
    zero-initialised unless `zero_head=False` -- BiT transfer starts from a zero head.
    """
    from ..checkpoints import Checkpoint, CheckpointError, download_pretrained, load_weights, read_checkpoint

    spec = get_model_spec(name)
    ckpt = pretrained if isinstance(pretrained, Checkpoint) else None
    if ckpt is None and pretrained is not False:
        path = download_pretrained(spec) if pretrained is True else pretrained
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            if pretrained is not True or spec.bundled is not None:
                raise
            raise CheckpointError(f"{e}. It is the cached download of {spec.name}: delete it, and it is fetched "
                                  "again") from e
    head = num_classes if num_classes is not None else (ckpt.num_classes if ckpt else spec.num_classes)
    model = ResNetV2(spec.arch, num_classes=head, zero_head=zero_head)
    if ckpt is not None:
        load_weights(model, ckpt)  # with its head's scoring, which a released file's name tells
        log.info("loaded %s weights (%s format) from %s", spec.name, ckpt.format, ckpt.path)
    return model

