"""Decoding and input discovery, checked on pixel values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fpn_cli import ImageError, UsageError
from fpn_cli.images import Resize, decode, find_images, probe_size

from imagefactory import (
    gradient,
    mixed_folder,
    save_16bit_gray,
    save_animation,
    save_exif_rotated,
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
