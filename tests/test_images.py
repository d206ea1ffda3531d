"""Decoding and input discovery, checked on pixel values."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from fpn_cli import ImageError, UsageError
from fpn_cli.inputs.images import Resize, decode, find_images, probe_size, read_names, warnings_to

from imagefactory import (
    eps_named_jpg,
    gradient,
    mixed_folder,
    save_16bit_gray,
    save_animation,
    save_corrupt_exif_jpeg,
    save_exif_rotated,
    save_png16,
    save_rgb,
    truncated_jpeg,
)


def test_exif_orientation_6_is_rotated_clockwise_on_pixels(tmp_path):
    stored = save_exif_rotated(tmp_path / "r.jpg", 24, 40, orientation=6)
    rgb, size = decode(tmp_path / "r.jpg", Resize())
    assert size == (40, 24)
    np.testing.assert_array_equal(rgb, np.rot90(stored, k=-1))
    assert probe_size(tmp_path / "r.jpg") == (40, 24)


def test_exif_orientation_3_is_rotated_half_a_turn(tmp_path):
    stored = save_exif_rotated(tmp_path / "r.jpg", 24, 40, orientation=3)
    rgb, _ = decode(tmp_path / "r.jpg", Resize())
    np.testing.assert_array_equal(rgb, np.rot90(stored, k=2))


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]])
    save_16bit_gray(tmp_path / "g16.png", values)
    rgb, _ = decode(tmp_path / "g16.png", Resize())
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_grayscale_fills_all_three_channels(tmp_path):
    gray = gradient(8, 9)[:, :, 1]
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb, _ = decode(tmp_path / "g.png", Resize())
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_drops_alpha_and_keeps_colour(tmp_path):
    colour = gradient(8, 9)
    Image.fromarray(np.dstack([colour, np.zeros((8, 9), np.uint8)]), "RGBA").save(tmp_path / "a.png")
    rgb, _ = decode(tmp_path / "a.png", Resize())
    np.testing.assert_array_equal(rgb, colour)


def test_palette_image_gets_its_palette_colours(tmp_path):
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)
    Image.fromarray(colours).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    rgb, _ = decode(tmp_path / "p.png", Resize())
    np.testing.assert_array_equal(rgb, colours)


def test_cmyk_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (6, 5), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    rgb, _ = decode(tmp_path / "c.jpg", Resize())
    assert rgb.shape == (5, 6, 3)
    assert np.abs(rgb.astype(int) - [255, 0, 0]).max() <= 8


def test_animation_gives_its_first_frame(tmp_path):
    save_animation(tmp_path / "anim.gif", 5, 7)
    rgb, _ = decode(tmp_path / "anim.gif", Resize())
    assert (rgb == [255, 0, 0]).all()


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, not a picture"), "not an image file"),
        (truncated_jpeg, "truncated or corrupt"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), "image"),
    ],
)
def test_unreadable_inputs_raise_a_one_line_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageError, match=reason) as e:
        decode(path, Resize())
    assert "\n" not in str(e.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    save_rgb(tmp_path / "big.png", 20, 30)
    with pytest.raises(ImageError, match="decompression bomb: 30x20 = 600 pixels exceeds 599"):
        decode(tmp_path / "big.png", Resize(), max_pixels=599)


@pytest.mark.parametrize(
    "resize,expected",
    [
        (Resize(size=(64, 32)), (64, 32)),
        (Resize(short_side=800, max_side=1333), (800, 1200)),  # 400x600 -> short side 800
        (Resize(short_side=800, max_side=1000), (667, 1000)),  # capped by the long side
        (Resize(max_side=300), (200, 300)),
        (Resize(max_side=3000), (400, 600)),  # never enlarges by a cap alone
    ],
)
def test_resize_policy(resize, expected):
    assert resize.target(400, 600) == expected


def test_resize_is_applied_to_pixels(tmp_path):
    save_rgb(tmp_path / "x.png", 40, 60)
    rgb, size = decode(tmp_path / "x.png", Resize(short_side=20))
    assert size == (40, 60) and rgb.shape == (20, 30, 3)


def test_size_and_short_side_are_exclusive():
    with pytest.raises(UsageError, match="cannot be combined"):
        Resize(size=(10, 10), short_side=5)


def test_folders_are_searched_recursively_with_case_insensitive_extensions(tmp_path):
    expected = mixed_folder(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "folder.jpg").mkdir()  # a folder with an image's name is not an image
    found = find_images([tmp_path / "in"])
    assert sorted(im.rel for im in found) == sorted(expected)


def test_a_file_is_relative_to_its_own_folder_and_a_glob_to_its_fixed_part(tmp_path):
    save_rgb(tmp_path / "a" / "b" / "cat.jpg", 4, 4)
    save_rgb(tmp_path / "a" / "c" / "dog.png", 4, 4)
    assert [im.key for im in find_images([tmp_path / "a" / "b" / "cat.jpg"])] == ["cat"]
    found = find_images([str(tmp_path / "a" / "**" / "*.*")])
    assert [im.key for im in found] == ["b/cat", "c/dog"]


def test_two_files_that_would_share_an_output_folder_are_named(tmp_path):
    save_rgb(tmp_path / "cat.jpg", 4, 4)
    save_rgb(tmp_path / "cat.png", 4, 4)
    with pytest.raises(UsageError, match=r"cat\.jpg and .*cat\.png would both write cat/"):
        find_images([tmp_path])


def test_the_same_file_twice_counts_once(tmp_path):
    save_rgb(tmp_path / "cat.jpg", 4, 4)
    assert len(find_images([tmp_path, tmp_path / "cat.jpg"])) == 1


def test_symlink_loop_is_listed_once(tmp_path):
    save_rgb(tmp_path / "in" / "cat.jpg", 4, 4)
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in")
    assert [im.rel for im in find_images([tmp_path / "in"])] == ["cat.jpg"]


def test_output_folder_inside_the_input_is_not_searched(tmp_path):
    save_rgb(tmp_path / "cat.jpg", 4, 4)
    save_rgb(tmp_path / "out" / "cat" / "preview.png", 4, 4)
    assert [im.rel for im in find_images([tmp_path], exclude=tmp_path / "out")] == ["cat.jpg"]


def test_no_images_and_missing_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no image files found"):
        find_images([tmp_path])
    with pytest.raises(UsageError, match="does not exist"):
        find_images([tmp_path / "nope"])
    with pytest.raises(UsageError, match="matches no image files"):
        find_images([str(tmp_path / "*.jpg")])


def run_with_deadline(fn, seconds: float = 10):
    """``fn()`` on a thread; fails the test if it blocks (a FIFO's open would wait forever)."""
    import threading

    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_a_fifo_is_refused_at_once_by_decode_and_probe(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    with pytest.raises(ImageError, match=r"not a regular file \(a FIFO\)"):
        run_with_deadline(lambda: decode(tmp_path / "x.jpg", Resize()))
    assert run_with_deadline(lambda: probe_size(tmp_path / "x.jpg")) is None


def test_listing_reports_special_files_broken_links_and_unreadable_folders(tmp_path, monkeypatch):
    import socket

    root = tmp_path / "in"
    save_rgb(root / "ok.png", 8, 8)
    os.mkfifo(root / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    os.symlink(root / "gone.png", root / "dangling.jpg")
    (root / "private").mkdir()
    save_rgb(root / "private" / "hidden.png", 8, 8)
    os.mkfifo(root / "notes.txt")  # not image-named: not an input at all
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = {im.rel: im.error for im in find_images([root])}
    sock.close()
    assert found == {
        "ok.png": None,
        "fifo.jpg": "not a regular file (a FIFO)",
        "sock.png": "not a regular file (a socket)",
        "dangling.jpg": "broken symbolic link",
        "private/": "cannot read folder: Permission denied",
    }


def test_listed_names_are_verbatim_and_a_missing_one_is_a_failed_input(tmp_path):
    save_rgb(tmp_path / " lead.png", 8, 8)
    listed = io.BytesIO(f"{tmp_path}/ lead.png\n{tmp_path}/missing.png\n".encode())
    found = find_images(["-"], read_names(listed))
    assert {im.rel: im.error for im in found} == {" lead.png": None, "missing.png": "does not exist"}


def test_names_are_read_by_lines_or_nul_separated_whatever_bytes_they_hold():
    text = b"a b.png\r\n\n\xff.jpg\nlast.png"
    assert list(read_names(io.BytesIO(text))) == ["a b.png\r", os.fsdecode(b"\xff.jpg"), "last.png"]
    assert list(read_names(io.BytesIO(b"new\nline.png\0\0 x.png\0"), null=True)) == [
        "new\nline.png",
        " x.png",
    ]


def test_out_equal_to_an_input_folder_is_a_usage_error(tmp_path):
    save_rgb(tmp_path / "a.png", 8, 8)
    with pytest.raises(UsageError, match="is the input folder"):
        find_images([tmp_path], exclude=tmp_path)


def test_eps_named_jpg_never_reaches_ghostscript(tmp_path, monkeypatch):
    import subprocess

    from PIL import EpsImagePlugin

    def refuse(*args, **kwargs):
        raise AssertionError("an external program was started")

    monkeypatch.setattr(subprocess, "check_call", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", "gs")
    eps_named_jpg(tmp_path / "doc.jpg")
    with pytest.raises(ImageError, match="not an image file of the formats read"):
        decode(tmp_path / "doc.jpg", Resize())
    assert probe_size(tmp_path / "doc.jpg") is None


def test_16_bit_colour_png_is_scaled_by_1_over_257(tmp_path):
    values = np.array([[[1000, 257, 65535], [0, 32896, 128]]], dtype=np.uint16)
    save_png16(tmp_path / "c16.png", values)
    rgb, _ = decode(tmp_path / "c16.png", Resize())
    np.testing.assert_array_equal(rgb, np.rint(values / 257).astype(np.uint8))
    assert rgb[0, 0, 0] == 4  # 1000 / 257 = 3.89, not the high byte 3
    rgba = np.dstack([values, np.full((1, 2), 7, np.uint16)])
    save_png16(tmp_path / "c16a.png", rgba)
    np.testing.assert_array_equal(decode(tmp_path / "c16a.png", Resize())[0], rgb)


def test_decoding_warnings_become_one_line_naming_the_file(tmp_path, recwarn):
    save_corrupt_exif_jpeg(tmp_path / "exif.jpg")
    lines: list[str] = []
    with warnings_to(lines.append):
        decode(tmp_path / "exif.jpg", Resize())
        decode(tmp_path / "exif.jpg", Resize())  # every time, not once per place in Pillow
    assert lines == [f"warning: {tmp_path / 'exif.jpg'}: Tag data larger than file. Skipping tag 270"] * 2
    assert not [w for w in recwarn if "Tag data" in str(w.message)]


def test_nan_in_a_float_tiff_is_black_with_a_warning(tmp_path):
    Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    lines: list[str] = []
    with warnings_to(lines.append):
        rgb, _ = decode(tmp_path / "f.tif", Resize())
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128])
    assert lines == [f"warning: {tmp_path / 'f.tif'}: NaN pixels read as 0"]


def test_max_pixels_above_pillows_own_limit_takes_effect(tmp_path, monkeypatch):
    save_rgb(tmp_path / "big.png", 60, 60)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse 3600 pixels
    rgb, _ = decode(tmp_path / "big.png", Resize(), max_pixels=5000)
    assert rgb.shape == (60, 60, 3)


def test_a_resize_past_max_pixels_is_a_failed_input_not_an_allocation(tmp_path):
    save_rgb(tmp_path / "x.png", 10, 10)
    with pytest.raises(ImageError, match="would exceed --max-pixels"):
        decode(tmp_path / "x.png", Resize(short_side=100_000), max_pixels=10_000_000)
