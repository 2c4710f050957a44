"""Image I/O helpers: [-1, 1] float arrays to uint8, PNG grids."""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """NHWC floats in [-1, 1] to uint8 pixels (round to nearest, clipped)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, cols: int | None = None, upscale: int = 1, pad: int = 1) -> Image.Image:
    """Tile NHWC images (floats in [-1, 1] or uint8) into one PIL image, each pixel upscaled,
    tiles separated by `pad` grey pixels."""
    pixels = images if images.dtype == np.uint8 else to_uint8(images)
    n, h, w, c = pixels.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    pixels = pixels.repeat(upscale, 1).repeat(upscale, 2)
    h, w = h * upscale + pad, w * upscale + pad
    grid = np.full((rows * h + pad, cols * w + pad, c), 128, np.uint8)
    for i, img in enumerate(pixels):
        r, k = divmod(i, cols)
        grid[pad + r * h:(r + 1) * h, pad + k * w:(k + 1) * w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)
