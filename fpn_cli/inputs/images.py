"""Finding input images, decoding them to 8-bit RGB, and the resize policy.

Decoding follows DESIGN.md §4: EXIF orientation applied, first frame of animations, every Pillow
mode converted to 8-bit RGB (16-bit scaled by 1/257, not clipped), decompression bombs refused.
Only the formats in :data:`IMAGE_FORMATS` are ever tried: Pillow would hand an EPS file named
``.jpg`` to Ghostscript, and untrusted input must never reach an external program. Inputs are
opened without blocking and must be regular files, so a FIFO or a device never hangs a run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fpn_cli.errors import ImageError, UsageError
from fpn_cli.inputs.keys import output_key, relative_paths
from fpn_cli.layout import SETTINGS_FILE, file_kind

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .jp2".split()
)
# Pillow's plugins that may open an input (its JPEG plugin also reads phones' multi-picture JPEGs)
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "JPEG2000")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
_GLOB_CHARS = frozenset("*?[")
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
_TRANSPOSES = {  # EXIF orientation -> the transpose that shows the picture upright (as ImageOps)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Readable(Protocol):
    """An input that is not a local file (a tar member, a URL: sources.py): ``open()`` gives its
    bytes as a seekable file, or raises :class:`ImageError`; ``str()`` names it in messages."""

    def open(self) -> BinaryIO: ...

    def stat(self) -> tuple[int, int, str | None]:
        """(size in bytes, modification time in ns, a version tag or None) as its source tells
        them now, for its fingerprint (resume.py); an :class:`ImageError` if it cannot be read."""

    def locator(self) -> dict[str, str]:
        """Where it is, as its record names it: ``{"input": ...}`` and what else finds it."""


@dataclass(frozen=True)
class InputImage:
    """One image to process: where it is, and its path relative to its input root."""

    # a local file as a plain string (listing a million files should not build a million Paths),
    # or a Readable: a tar member, a URL
    path: str | Readable
    rel: str  # posix, with extension: "x/cat.jpg"
    error: str | None = None  # why listing found it unusable (a FIFO, an unreadable folder)
    key: str = field(init=False)  # the output folder under OUT: ``rel`` without its extension

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", output_key(self.rel))


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _unusable(path: str) -> str:
    """Why an image-named entry that is not a regular file cannot be read."""
    try:
        return f"not a regular file ({file_kind(os.stat(path).st_mode)})"
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file disappeared while listing"
    except OSError as e:
        return f"cannot stat: {e.strerror or e}"


def _walk(root: str, exclude: Path | None) -> Iterable[InputImage]:
    """Image files below ``root`` relative to it, following symlinked folders once each (a loop
    ends there), and never inside an fpn-extract output folder (one with a settings file).
    Image-named entries that are not regular files, and folders that cannot be read, come back
    with their ``error`` set: nothing is dropped silently."""
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
        except OSError as e:
            rel = folder[prefix:].replace(os.sep, "/") or "."
            yield InputImage(folder, rel + "/", error=f"cannot read folder: {e.strerror or e}")
            continue
        if any(entry.name == SETTINGS_FILE for entry in entries):
            continue  # another run's output folder: its previews are no inputs
        for entry in entries:
            rel = entry.path[prefix:].replace(os.sep, "/")
            try:
                if entry.is_dir():
                    stack.append(entry.path)
                elif is_image_name(entry.name):
                    if entry.is_file():
                        yield InputImage(entry.path, rel)
                    else:
                        yield InputImage(entry.path, rel, error=_unusable(entry.path))
            except OSError as e:
                yield InputImage(entry.path, rel, error=f"cannot stat: {e.strerror or e}")


def _glob_root(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard: ``imgs/**/*.jpg`` -> ``imgs``."""
    parts = Path(pattern).parts
    first_wild = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    return Path(*parts[:first_wild]) if first_wild else Path(".")


def expand_local(spec: str, exclude: Path | None, listed: bool) -> list[InputImage]:
    """The images of one local input: a file, a folder (recursive) or a glob pattern; ``listed``
    (a line of a list) is taken verbatim and, missing, is a failed input rather than an error."""
    if os.path.isdir(spec):
        if exclude is not None and _same_file(spec, exclude):
            raise UsageError(
                f"--out {exclude} is the input folder {spec}: choose an output folder outside it"
            )
        return list(_walk(spec, exclude))
    if os.path.lexists(spec):
        return [InputImage(spec, os.path.basename(spec), None if os.path.isfile(spec) else _unusable(spec))]
    if _GLOB_CHARS & set(spec) and not listed:
        root = _glob_root(spec)
        found: list[InputImage] = []
        for match in map(Path, glob.glob(spec, recursive=True)):
            rel = match.relative_to(root).as_posix()
            if match.is_dir():
                found += [
                    InputImage(im.path, f"{rel}/{im.rel}", im.error) for im in _walk(str(match), exclude)
                ]
            elif is_image_name(match.name):
                found.append(InputImage(str(match), rel, None if match.is_file() else _unusable(str(match))))
        if not found:
            raise UsageError(f"pattern {spec!r} matches no image files")
        return found
    if listed:  # one line of a list: a failed input, not a reason to stop the whole run
        return [InputImage(spec, os.path.basename(spec), error="does not exist")]
    raise UsageError(f"input {spec} does not exist")


def find_images(
    inputs: Sequence[str | os.PathLike[str]],
    stdin_lines: Iterable[str] = (),
    exclude: Path | None = None,
    root: str | os.PathLike[str] | None = None,
) -> list[InputImage]:
    """Expands files, folders (recursive) and glob patterns into images sorted by output key.

    ``-`` among ``inputs`` stands for ``stdin_lines``, one path per item, taken verbatim
    (:func:`read_names` splits a stream into them); a listed path that does not exist is a failed
    input. Keys follow keys.py: files named one by one share ``root`` or their deepest common
    folder. ``exclude`` (the output folder) is never searched. The same file reached twice counts
    once; two files that would write the same output folder are a :class:`UsageError` naming both.
    Entries that cannot be images (FIFOs, unreadable folders) come back with ``error`` set.
    """
    exclude = exclude.resolve() if exclude is not None else None
    found = [
        (image, names_one_file(spec, listed))
        for spec, listed in input_specs(inputs, stdin_lines)
        for image in expand_local(spec, exclude, listed)
    ]
    return unique_images(share_root(found, root))


def names_one_file(spec: str, listed: bool) -> bool:
    """Whether the local input ``spec`` names one file (an argument, a line of a list or of
    stdin), keyed by the root those share (keys.py), rather than a folder or a pattern."""
    return not os.path.isdir(spec) and (listed or os.path.lexists(spec))


def share_root(
    found: Iterable[tuple[InputImage, bool]], root: str | os.PathLike[str] | None = None
) -> list[InputImage]:
    """The images of ``found`` (image, named one by one) keyed by keys.py's rule: those named
    one by one relative to ``root``, or else to their deepest common folder; with ``root``, the
    local files of folders and patterns relative to it too. Tar members keep their names."""
    found = list(found)
    named = [image for image, one in found if one]
    root = None if root is None else os.fspath(root)
    rels = iter(relative_paths([str(image.path) for image in named], root))
    keyed = []
    for image, one in found:
        if one:
            image = InputImage(image.path, next(rels), image.error)
        elif root is not None and isinstance(image.path, str) and image.error is None:
            image = InputImage(image.path, relative_paths([image.path], root)[0])
        keyed.append(image)
    return keyed


def input_specs(
    inputs: Sequence[str | os.PathLike[str]], stdin_lines: Iterable[str]
) -> list[tuple[str, bool]]:
    """(spec, listed) for each input: ``-`` stands for ``stdin_lines``, each a listed path taken
    verbatim (:func:`read_names` splits a stream into them); empty names are skipped."""
    specs: list[tuple[str, bool]] = []
    for spec in map(str, inputs):
        if spec == "-":
            specs += [(name, True) for name in stdin_lines if name]
        else:
            specs.append((spec, False))
    return specs


def unique_images(images: Iterable[InputImage]) -> list[InputImage]:
    """``images`` sorted by key, each file once; two files that would write the same output
    folder are a :class:`UsageError` naming both, and no image at all is one too."""
    by_key: dict[str, InputImage] = {}
    for image in images:
        # casefolded: on macOS and Windows, Cat/ and cat/ are one folder
        key = image.key.casefold() if image.error is None else "\0" + str(image.path)
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


def read_names(stream: BinaryIO, null: bool = False) -> Iterator[str]:
    """The paths in ``stream``: one a line with only the line's ``\\n`` removed (a leading space or
    a ``\\r`` is part of the name), or, with ``null``, separated by NUL bytes as ``find -print0``
    writes them, so that any name, newlines included, comes through. Bytes that are not UTF-8
    are kept as the file system's own names (``os.fsdecode``); empty names are skipped."""
    separator = b"\0" if null else b"\n"
    rest = b""
    while chunk := stream.read(1 << 16):
        *names, rest = (rest + chunk).split(separator)
        yield from (os.fsdecode(name) for name in names if name)
    if rest:
        yield os.fsdecode(rest)


def _same_file(a: str | Path | Readable, b: str | Path | Readable) -> bool:
    if not isinstance(a, (str, os.PathLike)) or not isinstance(b, (str, os.PathLike)):
        return a == b  # tar members, URLs: the same when they name the same bytes
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

    def describe(self) -> str | None:
        """How images are resized, for messages ("to 320x480", "shorter side 800, longer side at
        most 1333"); None when they keep their size."""
        if self.size is not None:
            return f"to {self.size[0]}x{self.size[1]}"
        parts = (("shorter side", self.short_side), ("longer side at most", self.max_side))
        return ", ".join(f"{name} {value}" for name, value in parts if value) or None

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
        if np.isnan(values).any():
            warnings.warn("NaN pixels read as 0", RuntimeWarning, stacklevel=2)
            values = np.nan_to_num(values, nan=0.0)
        full_scale = 1.0 if image.mode == "F" else 65535.0
        gray = np.rint(np.clip(values / full_scale, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading without ever blocking: a FIFO, socket or device is refused at
    once with an :class:`ImageError` (a FIFO's open would wait for a writer forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageError("file disappeared before it could be read") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"not a regular file ({file_kind(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_input(path: str | Path | Readable) -> BinaryIO:
    """An input opened for reading: a local file by :func:`open_regular` (never blocking), any
    other through its own ``open()``."""
    return open_regular(path) if isinstance(path, (str, os.PathLike)) else path.open()


def _is_empty(f: BinaryIO) -> bool:
    if hasattr(f, "fileno"):
        with contextlib.suppress(OSError, io.UnsupportedOperation):
            return os.fstat(f.fileno()).st_size == 0
    empty = f.seek(0, os.SEEK_END) == 0
    f.seek(0)
    return empty


# torchvision 0.29 deprecates its PNG decoder in favour of TorchCodec; it is what reads 16-bit colour
# PNGs whole here, and its note is for us, not the user (catch_warnings is not thread-safe: a filter)
warnings.filterwarnings(
    "ignore", r"The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)

_context = threading.local()  # the file a decode thread is reading, for warnings raised meanwhile


@contextlib.contextmanager
def warnings_to(log: Callable[[str], None]) -> Iterator[None]:
    """For the length of a run: every warning raised while a file is decoded (corrupt EXIF, NaN
    in a float TIFF) becomes one ``log`` line naming the file, every time, in any thread."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        path = getattr(_context, "path", None)
        if path is None:
            previous(message, category, filename, lineno, file, line)
        else:
            log(f"warning: {path}: {str(message).splitlines()[0] if str(message) else category.__name__}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check sizes ourselves
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning
        )  # libraries' notes to us, not about files
        warnings.showwarning = show
        yield


def _formats() -> list[str]:
    """The allowed formats this Pillow build can read (WebP and JPEG 2000 are optional in it)."""
    Image.init()
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def _allow_pixels(max_pixels: int) -> None:
    """Pillow refuses images past twice its own limit before we see them: raise its limit to ours."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


@dataclass(frozen=True)
class Decoded:
    """An image as the network gets it, and what was done to get there."""

    rgb: np.ndarray  # (H', W', 3) uint8, resized
    size: tuple[int, int]  # (H, W) as decoded, EXIF orientation applied
    orientation: int  # the EXIF orientation applied: 1 (none) to 8, as the tag's values


@dataclass(frozen=True)
class Probe:
    """What an image's header says: its size after EXIF orientation, and that orientation."""

    size: tuple[int, int]  # (H, W), upright
    orientation: int  # 1 (none) to 8


def decode(
    path: str | Path | Readable, resize: Resize, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads ``path`` -> ((H', W', 3) uint8 RGB after resizing, (H, W) as decoded): the
    :func:`decode_image` fields most callers need."""
    decoded = decode_image(path, resize, max_pixels)
    return decoded.rgb, decoded.size


def decode_image(
    path: str | Path | Readable, resize: Resize, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded:
    """Reads ``path`` (a local file, or a :class:`Readable`) -> :class:`Decoded`. Raises
    :class:`ImageError` with a one-line reason for anything that is not a readable image."""
    _context.path = str(path)
    try:
        return _decode(path, resize, max_pixels)
    except MemoryError:  # the resize's allocation too, not only the decoder's
        raise ImageError("not enough memory to decode and resize it") from None
    finally:
        _context.path = None


def _decode(path: str | Path | Readable, resize: Resize, max_pixels: int) -> Decoded:
    _allow_pixels(max_pixels)
    try:
        with open_input(path) as f:
            if _is_empty(f):
                raise ImageError("empty file")
            with Image.open(f, formats=_formats()) as image:
                sixteen_bit = _is_16bit_rgb_png(image)  # before getexif(), which loads a PNG
                orientation = _orientation(image)
                w, h = image.size
                if w * h > max_pixels:
                    raise ImageError(f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds {max_pixels:,}")
                target = resize.target(*((w, h) if orientation in _SWAPS_AXES else (h, w)))
                if target[0] * target[1] > max_pixels:
                    raise ImageError(
                        f"resizing to {target[0]}x{target[1]} would exceed --max-pixels {max_pixels:,}"
                    )
                image.seek(0)  # the first frame of an animation
                if sixteen_bit:
                    f.seek(0)
                    rgb = _upright(_png16_to_rgb8(f.read()), orientation)
                else:
                    image.load()
                    rgb = to_rgb8(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image file of the formats read ({', '.join(IMAGE_FORMATS)})") from None
    except MemoryError:
        raise ImageError("not enough memory to decode it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"truncated or corrupt image: {reason}") from None
    size = rgb.shape[:2]
    target = resize.target(*size)
    if target != size:
        resized = Image.fromarray(rgb).resize((target[1], target[0]), Image.Resampling.BILINEAR)
        rgb = np.asarray(resized)
    return Decoded(rgb, size, orientation)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation that decoding applies: 2 to 8 as the tag says; 1 for none, for values
    outside the standard's (which ``ImageOps.exif_transpose`` ignores too) and for a corrupt EXIF
    block (the picture as stored)."""
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if value in _TRANSPOSES else 1


def _upright(rgb: np.ndarray, orientation: int) -> np.ndarray:
    if orientation not in _TRANSPOSES:
        return rgb
    return np.asarray(Image.fromarray(rgb).transpose(_TRANSPOSES[orientation]))


def _is_16bit_rgb_png(image: Image.Image) -> bool:
    """Pillow reads 16-bit colour PNGs as 8-bit by taking the high byte (1000 -> 3, not 4)."""
    if image.format != "PNG" or image.mode not in ("RGB", "RGBA") or not image.tile:
        return False
    return str(image.tile[0].args).startswith(("RGB;16", "RGBA;16"))


def _png16_to_rgb8(data: bytes) -> np.ndarray:
    """A 16-bit colour PNG through torchvision's PNG decoder, scaled by 1/257 (rounded)."""
    import torch
    from torchvision.io import ImageReadMode, decode_png

    pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    values = pixels.permute(1, 2, 0).numpy().astype(np.float64)
    return np.rint(values / 257.0).astype(np.uint8)


def read_header(path: str | Path | Readable) -> Probe:
    """:class:`Probe` of ``path`` (a local file, or a :class:`Readable`) from the header alone; an
    :class:`ImageError` with the reason if the file cannot be read (never blocks: a FIFO or
    device is refused at once)."""
    try:
        with open_input(path) as f, Image.open(f, formats=_formats()) as image:
            w, h = image.size
            orientation = _orientation(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image file of the formats read ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"truncated or corrupt image: {reason}") from None
    return Probe((w, h) if orientation in _SWAPS_AXES else (h, w), orientation)


def image_size(path: str | Path | Readable) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the header alone (:func:`read_header`'s size); an
    :class:`ImageError` if the file cannot be read."""
    return read_header(path).size


def probe(path: str | Path | Readable) -> Probe | None:
    """:func:`read_header`, or None if the file cannot be read."""
    try:
        return read_header(path)
    except ImageError:
        return None


def probe_size(path: str | Path | Readable) -> tuple[int, int] | None:
    """(H, W) after EXIF orientation, from the header alone; None if the file cannot be read."""
    found = probe(path)
    return found.size if found else None
