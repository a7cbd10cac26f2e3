"""An independent writer of the authors' .npz layout (REFERENCE.md section 3), written from the
reference text rather than from our converter, so that parity tests do not trust our own names."""

from __future__ import annotations

import numpy as np


def random_bit_npz(path, depths, width, num_classes, seed=0):
    """Random weights under the released array names, HWIO kernels; returns the dict written."""
    rng = np.random.default_rng(seed)

    def kernel(k, cin, cout):
        return rng.standard_normal((k, k, cin, cout), dtype=np.float32)

    def gn(prefix, c):
        return {f"{prefix}/gamma": (1 + 0.2 * rng.standard_normal(c)).astype(np.float32),
                f"{prefix}/beta": (0.2 * rng.standard_normal(c)).astype(np.float32)}

    root = int(64 * width)
    arrays = {"resnet/root_block/standardized_conv2d/kernel": kernel(7, 3, root)}
    cin = root
    for b, depth in enumerate(depths, start=1):
        cout = int(256 * width * 2 ** (b - 1))
        mid = cout // 4
        for u in range(1, depth + 1):
            p = f"resnet/block{b}/unit{u:02d}/"
            arrays[p + "a/standardized_conv2d/kernel"] = kernel(1, cin, mid)
            arrays[p + "b/standardized_conv2d/kernel"] = kernel(3, mid, mid)
            arrays[p + "c/standardized_conv2d/kernel"] = kernel(1, mid, cout)
            arrays |= gn(p + "a/group_norm", cin) | gn(p + "b/group_norm", mid) | gn(p + "c/group_norm", mid)
            if u == 1:
                arrays[p + "a/proj/standardized_conv2d/kernel"] = kernel(1, cin, cout)
            cin = cout
    arrays |= gn("resnet/group_norm", cin)
    arrays["resnet/head/conv2d/kernel"] = (0.05 * rng.standard_normal((1, 1, cin, num_classes))).astype(np.float32)
    arrays["resnet/head/conv2d/bias"] = (0.1 * rng.standard_normal(num_classes)).astype(np.float32)
    np.savez(path, **arrays)
    return arrays
