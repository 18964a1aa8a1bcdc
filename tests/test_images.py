"""Every image form a user hands over is read correctly, and every bad one is named in a clear error."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image

from ganrm_diffusers.utils.errors import ImageInputError
from ganrm_diffusers.utils.images import list_image_files, load_image, load_image_folder, to_pixels


def test_grayscale_palette_cmyk_and_la_become_rgb(tmp_path):
    gray = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L")
    gray.save(tmp_path / "gray.png")
    gray.convert("P").save(tmp_path / "palette.png")
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("LA", (2, 2), (90, 255)).save(tmp_path / "la.png")

    assert np.array(load_image(tmp_path / "gray.png"))[1, 0].tolist() == [200, 200, 200]
    assert np.array(load_image(tmp_path / "palette.png"))[0, 1].tolist() == [128, 128, 128]
    red = np.array(load_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert np.array(load_image(tmp_path / "la.png"))[0, 0].tolist() == [90, 90, 90]
    for name in ("gray.png", "palette.png", "cmyk.jpg", "la.png"):
        assert load_image(tmp_path / name).mode == "RGB"


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: keeps its colour
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette_alpha.png", transparency=0)

    pixels = np.array(load_image(tmp_path / "rgba.png"))
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert np.array(load_image(tmp_path / "palette_alpha.png")).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.array(load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 128, 255]


def test_corrupt_files_are_named_and_skipped_or_fatal_when_strict(tmp_path, caplog):
    folder = write_images(tmp_path / "images", [Image.new("RGB", (8, 8), "red")] * 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (folder / "img_0000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")

    with caplog.at_level(logging.WARNING):
        loaded = load_image_folder(folder)
    assert [path.name for path in loaded.paths] == ["img_0000.png", "img_0001.png"]
    assert {path.name for path, _ in loaded.skipped} == {"broken.png", "truncated.png"}
    assert "broken.png" in caplog.text and "truncated.png" in caplog.text
    with pytest.raises(ImageInputError, match="broken.png|truncated.png"):
        load_image_folder(folder, strict=True)


def test_empty_missing_and_too_small_folders_are_errors_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ImageInputError, match="empty.*no image files"):
        list_image_files(tmp_path / "empty")
    with pytest.raises(ImageInputError, match="missing.*does not exist"):
        list_image_files(tmp_path / "missing")
    write_images(tmp_path / "small", [Image.new("RGB", (4, 4))] * 3)
    with pytest.raises(ImageInputError, match=r"small has 3 readable image\(s\); at least 8"):
        load_image_folder(tmp_path / "small", min_images=8)


def test_metadata_prompts_are_read_in_file_order(tmp_path):
    folder = write_images(tmp_path / "gen", [Image.new("RGB", (4, 4))] * 2)
    lines = [{"file_name": "img_0001.png", "prompt": "second"}, {"file_name": "img_0000.png", "prompt": "first"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert load_image_folder(folder).prompts == ["first", "second"]


def test_tensor_layouts_and_dtypes_agree():
    uint8 = torch.randint(0, 256, (3, 3, 10, 12), dtype=torch.uint8)
    reference = uint8.float() / 255
    assert torch.equal(to_pixels(uint8), reference)
    assert torch.equal(to_pixels(uint8.permute(0, 2, 3, 1)), reference)  # NHWC, as ComfyUI
    assert torch.equal(to_pixels(reference.permute(0, 2, 3, 1)), reference)
    assert torch.allclose(to_pixels(reference * 2 - 1, value_range=(-1, 1)), reference, atol=1e-6)
    assert torch.equal(to_pixels(uint8[0]), reference[:1])  # one CHW image
    assert torch.equal(to_pixels(uint8.permute(0, 2, 3, 1).numpy()), reference)
    gray = torch.rand(2, 1, 5, 5)
    assert torch.equal(to_pixels(gray), gray.expand(-1, 3, -1, -1))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.full((1, 3, 4, 4), float("nan")), "NaN"),
        (torch.full((1, 3, 4, 4), float("inf")), "NaN or infinite"),
        (torch.full((1, 3, 4, 4), 3.0), r"must be in \[0.0, 1.0\]"),
        (torch.zeros(1, 7, 4, 9), "no channel axis"),
        (torch.zeros(0, 3, 4, 4), "empty batch"),
        ([], "empty batch"),
        ("a string", "cannot use str"),
    ],
)
def test_bad_tensors_are_clear_errors(bad, message):
    with pytest.raises(ImageInputError, match=message):
        to_pixels(bad)
