"""PNG renderings of feature maps: the image beside each level, every level shown at the image's
size with nearest-neighbour scaling (so each cell is one feature, and the stride shows), coloured
by the first three principal components of its channels. Pillow and numpy only; deterministic."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 384  # panels are the image's size, shrunk to this longest side
LABEL_HEIGHT = 16
GAP = 4
BACKGROUND = (255, 255, 255)


def principal_rgb(features: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w, 3) uint8: the first three principal components of the C channels over
    the h*w positions, each stretched between its 1st and 99th percentile. Component signs are
    fixed (largest projection positive) so the same features always give the same colours."""
    c, h, w = features.shape
    x = features.reshape(c, h * w).T.astype(np.float64)
    x -= x.mean(axis=0)
    n = x.shape[0]
    if n < 2 or not np.any(x):
        return np.full((h, w, 3), 128, np.uint8)
    if n <= c:  # the smaller Gram matrix gives the same projections
        vals, vecs = np.linalg.eigh(x @ x.T)
        proj = vecs[:, ::-1][:, :3] * np.sqrt(np.clip(vals[::-1][:3], 0, None))
    else:
        vals, vecs = np.linalg.eigh(x.T @ x)
        proj = x @ vecs[:, ::-1][:, :3]
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    signs = np.sign(proj[np.abs(proj).argmax(axis=0), np.arange(3)])
    proj *= np.where(signs == 0, 1, signs)
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    scaled = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8).reshape(h, w, 3)


def _panel_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, MAX_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def render(image: np.ndarray, levels: Mapping[str, np.ndarray]) -> Image.Image:
    """(H, W, 3) uint8 network input and {level: (C, h, w)} -> one PNG-ready picture: a row of
    panels, each labelled (``input 300x451``, ``P2 256x75x113``)."""
    ph, pw = _panel_size(*image.shape[:2])
    panels = [
        ("input {}x{}".format(*image.shape[:2]), Image.fromarray(image).resize((pw, ph), Image.BILINEAR))
    ]
    for name, feats in levels.items():
        rgb = principal_rgb(np.asarray(feats, dtype=np.float32))
        label = f"{name.upper()} {'x'.join(map(str, feats.shape))}"
        panels.append((label, Image.fromarray(rgb).resize((pw, ph), Image.NEAREST)))
    font = ImageFont.load_default()
    width = len(panels) * pw + (len(panels) + 1) * GAP
    canvas = Image.new("RGB", (width, ph + LABEL_HEIGHT + 2 * GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (label, panel) in enumerate(panels):
        x = GAP + i * (pw + GAP)
        draw.text((x, GAP), label, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, GAP + LABEL_HEIGHT))
    return canvas


def layout_size(image_height: int, image_width: int, n_levels: int) -> tuple[int, int]:
    """(width, height) of the picture :func:`render` makes."""
    ph, pw = _panel_size(image_height, image_width)
    return (n_levels + 1) * pw + (n_levels + 2) * GAP, ph + LABEL_HEIGHT + 2 * GAP
