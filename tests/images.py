"""Generated labelled images for tests: one coloured shape per class on a random background."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (220, 200, 40), (200, 60, 220), (40, 210, 210)]


def make_image_folder(root, classes=4, per_class=16, size=40, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw = ImageDraw.Draw(img)
            x, y = (int(v) for v in rng.integers(0, size // 2, 2))
            r = int(rng.integers(size // 4, size // 2))
            (draw.ellipse if c % 2 else draw.rectangle)([x, y, x + r, y + r], fill=COLORS[c % len(COLORS)])
            img.save(root / f"class{c}" / f"{i:03d}.png")
    return root
