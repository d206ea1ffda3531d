"""--preview: a PNG per image, deterministic, the same whether drawn during or after extraction."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fpn_cli.run.preview import layout_size, principal_rgb

from conftest import SEED, report_of, run
from imagefactory import save_rgb


def run_ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def make_inputs(folder):
    save_rgb(folder / "wide.png", 40, 72, seed=1)
    save_rgb(folder / "sub" / "tall.jpg", 70, 30, seed=2)
    return {"wide": (40, 72), "sub/tall": (70, 30)}


def test_preview_per_image_with_the_layout_size_and_content(tmp_path):
    expected = make_inputs(tmp_path / "in")
    run_ok(tmp_path / "in", "-o", tmp_path / "out", "--preview", *SEED)
    for key, (h, w) in expected.items():
        picture = Image.open(tmp_path / "out" / key / "preview.png")
        assert picture.size == layout_size(h, w, 4)
        pixels = np.asarray(picture)
        assert pixels.std() > 10  # not a constant picture
        assert picture.mode == "RGB"
    entries = report_of(tmp_path / "out")["images"]
    assert {e["preview"] for e in entries} == {"wide/preview.png", "sub/tall/preview.png"}


def test_previews_are_byte_identical_across_runs(tmp_path):
    make_inputs(tmp_path / "in")
    run_ok(tmp_path / "in", "-o", tmp_path / "a", "--preview", *SEED)
    run_ok(tmp_path / "in", "-o", tmp_path / "b", "--preview", *SEED)
    for key in ("wide", "sub/tall"):
        first = (tmp_path / "a" / key / "preview.png").read_bytes()
        assert first == (tmp_path / "b" / key / "preview.png").read_bytes()


def test_previews_drawn_from_an_existing_folder_match_and_recompute_nothing(tmp_path):
    make_inputs(tmp_path / "in")
    run_ok(tmp_path / "in", "-o", tmp_path / "during", "--preview", *SEED)
    run_ok(tmp_path / "in", "-o", tmp_path / "later", *SEED)
    features = {p: p.stat().st_mtime_ns for p in (tmp_path / "later").rglob("*.npy")}
    result = run_ok(tmp_path / "in", "-o", tmp_path / "later", "--preview", "--arch", "seed")
    assert "2 already complete" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in features} == features
    for key in ("wide", "sub/tall"):
        assert (tmp_path / "later" / key / "preview.png").read_bytes() == (
            tmp_path / "during" / key / "preview.png"
        ).read_bytes()


def test_levels_are_scaled_nearest_neighbour_so_cells_show():
    from fpn_cli.run.preview import render

    feats = np.zeros((3, 2, 2), np.float32)
    feats[:, 0, 0], feats[:, 1, 1] = (1, 2, 3), (-3, 1, 0)
    picture = np.asarray(render(np.zeros((64, 64, 3), np.uint8), {"p5": feats}))
    panel = picture[4 + 16 :, 4 + 64 + 4 :][:64, :64]
    quadrants = [panel[:32, :32], panel[:32, 32:], panel[32:, :32], panel[32:, 32:]]
    for q in quadrants:
        assert (q == q[0, 0]).all()  # one flat colour per feature cell
    assert not (quadrants[0][0, 0] == quadrants[3][0, 0]).all()


def test_principal_components_agree_with_svd():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 9, 11)) * np.linspace(3, 0.1, 16)[:, None, None]
    x = feats.reshape(16, -1).T
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    reference = u[:, :3] * s[:3]
    ours = principal_rgb(feats).reshape(-1, 3).astype(float)
    for k in range(3):
        corr = np.corrcoef(ours[:, k], reference[:, k])[0, 1]
        assert abs(corr) > 0.95, k


def test_degenerate_levels_render_grey():
    assert (principal_rgb(np.ones((8, 1, 1))) == 128).all()
    assert (principal_rgb(np.zeros((8, 3, 3))) == 128).all()
