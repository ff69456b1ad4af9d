"""decode_image: every supported flavour decodes to RGB uint8; every bad file is an ImageDecodeError."""
import errno
import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_prep import images
from data_prep.images import ALPHA_BACKGROUND, ImageDecodeError, decode_image, is_image_file

RED = (255, 0, 0)


def check_rgb(array, height, width):
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)
    assert array.flags["C_CONTIGUOUS"]


def gradient_rgb(height=24, width=32):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 7 % 256, y * 9 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# ---------------------------------------------------------------- formats that must decode

@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                        ("WEBP", ".webp")])
def test_lossless_formats_are_exact(tmp_path, fmt, suffix):
    pixels = gradient_rgb()
    options = {"lossless": True} if fmt == "WEBP" else {}
    path = save(Image.fromarray(pixels), tmp_path / f"img{suffix}", format=fmt, **options)
    decoded = decode_image(path)
    check_rgb(decoded, 24, 32)
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_path_str_and_bytes_agree(tmp_path):
    path = save(Image.fromarray(gradient_rgb()), tmp_path / "img.jpg", quality=95)
    from_path = decode_image(path)
    check_rgb(from_path, 24, 32)
    np.testing.assert_array_equal(decode_image(str(path)), from_path)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), from_path)
    assert np.abs(from_path.astype(int) - gradient_rgb()).mean() < 6


def test_rgba_transparent_pixels_get_the_background(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, :6, 3] = 255  # left half opaque, right half fully transparent
    decoded = decode_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png"))
    check_rgb(decoded, 10, 12)
    assert (decoded[:, :6] == (10, 200, 30)).all()
    assert (decoded[:, 6:] == ALPHA_BACKGROUND).all()


def test_half_transparent_pixel_is_mixed_with_background(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 128  # black at ~50 % over white -> ~127
    decoded = decode_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "half.png"))
    assert np.all(np.abs(decoded.astype(int) - 127) <= 1)


def test_la_image(tmp_path):
    la = Image.new("LA", (8, 6), (40, 255))
    la.putpixel((0, 0), (40, 0))
    decoded = decode_image(save(la, tmp_path / "la.png"))
    check_rgb(decoded, 6, 8)
    assert tuple(decoded[0, 0]) == ALPHA_BACKGROUND
    assert tuple(decoded[5, 7]) == (40, 40, 40)


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0] + list(RED))
    palette.putpixel((3, 3), 0)
    decoded = decode_image(save(palette, tmp_path / "pal.png", transparency=0))
    check_rgb(decoded, 8, 8)
    assert tuple(decoded[3, 3]) == ALPHA_BACKGROUND
    assert tuple(decoded[0, 0]) == RED


def test_palette_without_transparency(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0] + list(RED))
    decoded = decode_image(save(palette, tmp_path / "pal.png"))
    assert (decoded == RED).all()


def test_grayscale_l(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    decoded = decode_image(save(Image.fromarray(gray, "L"), tmp_path / "gray.png"))
    check_rgb(decoded, 6, 8)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_one_bit(tmp_path):
    bits = Image.new("1", (8, 4), 0)
    bits.putpixel((1, 1), 1)
    decoded = decode_image(save(bits, tmp_path / "bits.png"))
    check_rgb(decoded, 4, 8)
    assert tuple(decoded[1, 1]) == (255, 255, 255)
    assert decoded.sum() == 3 * 255


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode_image(save(image, tmp_path / "deep.png"))
    check_rgb(decoded, 1, 4)
    assert list(decoded[0, :, 0]) == [0, 128, 255, 4]


def test_sixteen_bit_big_endian(tmp_path):
    values = np.array([[0, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (2, 1), values.tobytes())
    assert image.mode == "I;16B"
    decoded = decode_image(save(image, tmp_path / "deep_be.tif"))
    assert list(decoded[0, :, 1]) == [0, 255]


def test_thirty_two_bit_int_and_float(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert ints.mode == "I"
    assert list(decode_image(save(ints, tmp_path / "int.tif"))[0, :, 0]) == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert list(decode_image(save(floats, tmp_path / "float.tif"))[0, :, 0]) == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    check_rgb(decoded, 16, 16)
    red, green, blue = decoded[8, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 8), RED), Image.new("RGB", (10, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    decoded = decode_image(path)
    check_rgb(decoded, 8, 10)
    assert (decoded == RED).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(Image.fromarray(gradient_rgb(20, 40)), tmp_path / "rotated.jpg", exif=exif.tobytes())
    check_rgb(decode_image(path), 40, 20)


def test_upper_case_extension_and_unicode_name(tmp_path):
    pixels = gradient_rgb()
    upper = save(Image.fromarray(pixels), tmp_path / "PHOTO.JPG", format="JPEG")
    check_rgb(decode_image(upper), 24, 32)
    assert is_image_file(upper)
    unicode_path = save(Image.fromarray(pixels), tmp_path / "名前_é.png")
    np.testing.assert_array_equal(decode_image(unicode_path), pixels)


def test_is_image_file():
    assert is_image_file("a/b.JPEG") and is_image_file("x.tiff") and is_image_file("y.WebP")
    assert not is_image_file("labels.txt") and not is_image_file("noext")


# ---------------------------------------------------------------- bad files

def assert_decode_error(source, name, reason_words):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(source)
    message = str(info.value)
    assert name in message
    assert message == f"{info.value.path}: {info.value.reason}"
    assert any(word in info.value.reason.lower() for word in reason_words), message
    return info.value


def test_missing_file(tmp_path):
    assert_decode_error(tmp_path / "nope.jpg", "nope.jpg", ["not found"])


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert_decode_error(path, "empty.png", ["empty"])


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert_decode_error(path, "notes.jpg", ["not an image"])


def test_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    assert_decode_error(tmp_path / "folder.png", "folder.png", ["directory"])


@pytest.mark.parametrize("error, words", [
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), ["permission denied"]),
    (OSError(errno.EIO, os.strerror(errno.EIO)), ["input/output error"]),
], ids=["no_permission", "io_error"])
def test_file_that_cannot_be_opened(tmp_path, monkeypatch, error, words):
    """Opening fails (simulated: as root, chmod 000 would not stop the read): named with the reason."""
    path = tmp_path / "locked.jpg"
    path.write_bytes(b"\xff\xd8")

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert_decode_error(path, "locked.jpg", words)


def truncated_jpeg(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jpeg(tmp_path):
    assert_decode_error(truncated_jpeg(tmp_path), "cut.jpg", ["truncated"])


def test_truncation_detected_even_if_lenient_mode_was_enabled(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert_decode_error(truncated_jpeg(tmp_path), "cut.jpg", ["truncated"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")  # noise: the pixel data is most of the file
    data = buffer.getvalue()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert_decode_error(path, "cut.png", ["truncated", "cannot decode"])


def test_decompression_bomb_by_our_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = save(Image.new("RGB", (20, 20)), tmp_path / "bomb.png")
    assert_decode_error(path, "bomb.png", ["decompression bomb"])


@pytest.mark.parametrize("pillow_limit", [10, 300])  # 400 px: Pillow's error, then its warning
def test_decompression_bomb_by_pillow(tmp_path, monkeypatch, pillow_limit):
    path = save(Image.new("RGB", (20, 20)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    assert_decode_error(path, "bomb.png", ["decompression bomb"])


def test_bytes_source_error_is_named():
    assert_decode_error(b"garbage bytes", "<bytes>", ["not an image"])
    assert_decode_error(b"", "<bytes>", ["empty"])


def test_wrong_source_type():
    with pytest.raises(TypeError):
        decode_image(42)
