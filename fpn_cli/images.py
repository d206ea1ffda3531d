"""Finding input images, decoding them to 8-bit RGB, and the resize policy.

Decoding follows DESIGN.md §4: EXIF orientation applied, first frame of animations, every Pillow
mode converted to 8-bit RGB (16-bit scaled by 1/257, not clipped), decompression bombs refused.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, UsageError

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .jp2".split()
)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
_GLOB_CHARS = frozenset("*?[")
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class InputImage:
    """One image to process: where it is, and its path relative to its input root."""

    path: str  # a plain string: listing a million files should not build a million Paths
    rel: str  # posix, with extension: "x/cat.jpg"
    key: str = field(init=False)  # the output folder under OUT: ``rel`` without its extension

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", os.path.splitext(self.rel)[0])


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: str, exclude: Path | None) -> Iterable[InputImage]:
    """Image files below ``root`` relative to it, following symlinked folders once each (a loop
    ends there)."""
    seen: set[tuple[int, int]] = set()
    excluded = os.stat(exclude) if exclude is not None and exclude.exists() else None
    prefix = len(os.path.join(root, ""))
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen or (excluded is not None and ident == (excluded.st_dev, excluded.st_ino)):
            continue
        seen.add(ident)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(entry.path)
                elif is_image_name(entry.name) and entry.is_file():
                    yield InputImage(entry.path, entry.path[prefix:].replace(os.sep, "/"))
            except OSError:  # a dangling link or a file that vanished while listing
                continue


def _glob_root(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard: ``imgs/**/*.jpg`` -> ``imgs``."""
    parts = Path(pattern).parts
    first_wild = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    return Path(*parts[:first_wild]) if first_wild else Path(".")


def _expand(spec: str, exclude: Path | None) -> list[InputImage]:
    if os.path.isdir(spec):
        return list(_walk(spec, exclude))
    if os.path.exists(spec):
        return [InputImage(spec, os.path.basename(spec))]
    if _GLOB_CHARS & set(spec):
        root = _glob_root(spec)
        found: list[InputImage] = []
        for match in map(Path, glob.glob(spec, recursive=True)):
            rel = match.relative_to(root).as_posix()
            if match.is_dir():
                found += [InputImage(im.path, f"{rel}/{im.rel}") for im in _walk(str(match), exclude)]
            elif match.is_file() and is_image_name(match.name):
                found.append(InputImage(str(match), rel))
        if not found:
            raise UsageError(f"pattern {spec!r} matches no image files")
        return found
    raise UsageError(f"input {spec} does not exist")


def find_images(
    inputs: Sequence[str | os.PathLike[str]], stdin_lines: Iterable[str] = (), exclude: Path | None = None
) -> list[InputImage]:
    """Expands files, folders (recursive) and glob patterns into images sorted by output key.

    ``-`` among ``inputs`` stands for ``stdin_lines``, one input per line. ``exclude`` (the output
    folder) is never searched. The same file reached twice counts once; two files that would write
    the same output folder are a :class:`UsageError` naming both.
    """
    specs: list[str] = []
    for spec in map(str, inputs):
        specs += [s.strip() for s in stdin_lines if s.strip()] if spec == "-" else [spec]
    exclude = exclude.resolve() if exclude is not None else None
    by_key: dict[str, InputImage] = {}
    for spec in specs:
        for image in _expand(spec, exclude):
            # casefolded: on macOS and Windows, Cat/ and cat/ are one folder
            key = image.key.casefold()
            other = by_key.get(key)
            if other is None:
                by_key[key] = image
            elif not _same_file(other.path, image.path):
                first, second = sorted([str(other.path), str(image.path)])
                raise UsageError(
                    f"{first} and {second} would both write {image.key}/ in the output folder; "
                    "rename one or give them separate input folders"
                )
    if not by_key:
        raise UsageError("no image files found in the inputs")
    return sorted(by_key.values(), key=lambda im: im.key)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass(frozen=True)
class Resize:
    """How images are resized before the network: exactly to ``size``, or so that the shorter side
    is ``short_side`` with the longer side capped at ``max_side`` (the detection convention,
    e.g. 800/1333); all None keeps the native size."""

    size: tuple[int, int] | None = None
    short_side: int | None = None
    max_side: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (self.short_side or self.max_side):
            raise UsageError("--size sets an exact size; it cannot be combined with --short-side/--max-side")

    def target(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the network's input for an image of ``height`` x ``width``."""
        if self.size is not None:
            return self.size
        scale = 1.0
        if self.short_side:
            scale = self.short_side / min(height, width)
        if self.max_side and max(height, width) * scale > self.max_side:
            scale = self.max_side / max(height, width)
        if scale == 1.0:
            return height, width
        return max(1, round(height * scale)), max(1, round(width * scale))


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8. 16-bit and 32-bit integer modes are scaled from
    [0, 65535] (values above are clipped), float mode ``F`` from [0, 1]; alpha is dropped, as
    ``Image.convert("RGB")`` and torchvision's readers do."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        full_scale = 1.0 if image.mode == "F" else 65535.0
        gray = np.rint(np.clip(values / full_scale, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode(
    path: str | Path, resize: Resize, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads ``path`` -> ((H', W', 3) uint8 RGB after resizing, (H, W) as decoded). Raises
    :class:`ImageError` with a one-line reason for anything that is not a readable image."""
    try:
        if os.stat(path).st_size == 0:
            raise ImageError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                w, h = image.size
                if w * h > max_pixels:
                    raise ImageError(f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds {max_pixels:,}")
                image.seek(0)  # the first frame of an animation
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = to_rgb8(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can decode") from None
    except FileNotFoundError:
        raise ImageError("file disappeared before it could be read") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"truncated or corrupt image: {reason}") from None
    size = rgb.shape[:2]
    target = resize.target(*size)
    if target != size:
        resized = Image.fromarray(rgb).resize((target[1], target[0]), Image.Resampling.BILINEAR)
        rgb = np.asarray(resized)
    return rgb, size


def probe_size(path: str | Path) -> tuple[int, int] | None:
    """(H, W) after EXIF orientation, from the header alone; None if the file cannot be read."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return None
    return (w, h) if orientation in _SWAPS_AXES else (h, w)
