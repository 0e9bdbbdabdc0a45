import base64
import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.images import ImageLimits, ImageUnavailableError, decode_image, load_image

LIMITS = ImageLimits()


def encoded(fmt: str, size=(40, 30), colour=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decodes_common_formats_to_uint8_chw(fmt):
    pixels = decode_image(encoded(fmt), 32, limits=LIMITS)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert abs(int(pixels[0].mean()) - 200) < 12 and abs(int(pixels[1].mean()) - 30) < 12


def test_large_jpeg_is_downscaled_while_decoding():
    pixels = decode_image(encoded("JPEG", size=(1600, 1200)), 64, limits=LIMITS)
    assert pixels.shape == (3, 64, 64)


def test_grayscale_and_rgba_become_rgb():
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (10, 10)).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), 8, limits=LIMITS).shape == (3, 8, 8)


def test_unusable_images_say_why(tmp_path):
    with pytest.raises(ImageUnavailableError) as info:
        decode_image(b"\xff\xd8\xff\xe0 truncated", 32, limits=LIMITS)
    assert info.value.status == "undecodable"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=str(tmp_path / "nope.jpg"), image_b64=None, size=32, limits=LIMITS)
    assert info.value.status == "missing"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=None, image_b64=None, size=32, limits=LIMITS)
    assert info.value.status == "absent"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url="ftp://host/x.jpg", image_b64=None, size=32, limits=LIMITS)
    assert info.value.status == "unsupported_url"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=None, image_b64="!!!not base64", size=32, limits=LIMITS)
    assert info.value.status == "undecodable"


def test_size_limits(tmp_path):
    path = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    assert path.stat().st_size > 1024
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=path.as_uri(), image_b64=None, size=32, limits=ImageLimits(max_bytes=1024))
    assert info.value.status == "too_large"
    with pytest.raises(ImageUnavailableError) as info:
        decode_image(encoded("PNG", size=(300, 300)), 32, limits=ImageLimits(max_pixels=10_000))
    assert info.value.status == "too_large"


def test_base64_and_file_url(tmp_path):
    data = encoded("PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    from_url = load_image(image_url=path.as_uri(), image_b64=None, size=16, limits=LIMITS)
    from_b64 = load_image(image_url=None, image_b64=base64.b64encode(data).decode(), size=16, limits=LIMITS)
    assert np.array_equal(from_url, from_b64)


@settings(max_examples=150)
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_image_unavailable(raw):
    with contextlib.suppress(ImageUnavailableError):
        assert decode_image(raw, 16, limits=LIMITS).shape == (3, 16, 16)


def test_http_image_and_unreachable_url(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "x.png").write_bytes(encoded("PNG"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pixels = load_image(image_url=f"{base}/x.png", image_b64=None, size=16, limits=LIMITS)
        assert pixels.shape == (3, 16, 16)
        with pytest.raises(ImageUnavailableError) as info:
            load_image(image_url=f"{base}/absent.png", image_b64=None, size=16, limits=LIMITS)
        assert info.value.status == "unreachable"
    finally:
        server.shutdown()
