import cv2
import numpy as np
import pytest

from fashionkp.data.images import ImageReadError, load_image, to_rgb8


def test_layouts_become_rgb8(tmp_path):
    gray = np.full((20, 30), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    img = load_image(tmp_path / "g.png")
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8 and (img == 100).all()

    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[..., 2] = 200  # red in BGR order
    bgra[..., 3] = 255
    bgra[0, 0, 3] = 0  # fully transparent -> white
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    img = load_image(tmp_path / "a.png")
    assert tuple(img[5, 5]) == (200, 0, 0) and tuple(img[0, 0]) == (255, 255, 255)

    deep = np.full((8, 8, 3), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert (load_image(tmp_path / "d.png") == 255).all()
    assert to_rgb8(np.zeros((4, 4, 1), np.uint8)).shape == (4, 4, 3)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found: .*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImageReadError, match="cannot decode.*trunc.jpg"):
        load_image(tmp_path / "trunc.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageReadError, match="text.jpg"):
        load_image(tmp_path / "text.jpg")
