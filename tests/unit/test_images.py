import base64
import contextlib
import io
import ipaddress
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.images import ImagePolicy, ImageUnavailableError, _is_public, decode_image, load_image

POLICY = ImagePolicy()
FILES = ImagePolicy.for_offer_files()  # offer files given on the command line: local images trusted


def encoded(fmt: str, size=(40, 30), colour=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decodes_common_formats_to_uint8_chw(fmt):
    pixels = decode_image(encoded(fmt), 32, policy=POLICY)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert abs(int(pixels[0].mean()) - 200) < 12 and abs(int(pixels[1].mean()) - 30) < 12


def test_large_jpeg_is_downscaled_while_decoding():
    pixels = decode_image(encoded("JPEG", size=(1600, 1200)), 64, policy=POLICY)
    assert pixels.shape == (3, 64, 64)


def test_grayscale_and_rgba_become_rgb():
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (10, 10)).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), 8, policy=POLICY).shape == (3, 8, 8)


def test_unusable_images_say_why(tmp_path):
    with pytest.raises(ImageUnavailableError) as info:
        decode_image(b"\xff\xd8\xff\xe0 truncated", 32, policy=POLICY)
    assert info.value.status == "undecodable"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=str(tmp_path / "nope.jpg"), image_b64=None, size=32, policy=FILES)
    assert info.value.status == "missing"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=None, image_b64=None, size=32, policy=POLICY)
    assert info.value.status == "absent"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url="ftp://host/x.jpg", image_b64=None, size=32, policy=POLICY)
    assert info.value.status == "unsupported_url"
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=None, image_b64="!!!not base64", size=32, policy=POLICY)
    assert info.value.status == "undecodable"


def test_size_limits(tmp_path):
    path = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    assert path.stat().st_size > 1024
    with pytest.raises(ImageUnavailableError) as info:
        load_image(
            image_url=path.as_uri(), image_b64=None, size=32, policy=ImagePolicy(max_bytes=1024, local_root=tmp_path)
        )
    assert info.value.status == "too_large"
    with pytest.raises(ImageUnavailableError) as info:
        decode_image(encoded("PNG", size=(300, 300)), 32, policy=ImagePolicy(max_full_decode_pixels=10_000))
    assert info.value.status == "too_large"


def test_jpeg_decodes_at_a_reduced_scale_so_it_gets_the_larger_pixel_bound():
    policy = ImagePolicy(max_pixels=200_000, max_full_decode_pixels=10_000)
    assert decode_image(encoded("JPEG", size=(400, 300)), 32, policy=policy).shape == (3, 32, 32)
    for fmt in ("PNG", "WEBP"):
        with pytest.raises(ImageUnavailableError, match="400x300 pixels"):
            decode_image(encoded(fmt, size=(400, 300)), 32, policy=policy)
    with pytest.raises(ImageUnavailableError, match="too_large"):
        decode_image(encoded("JPEG", size=(600, 400)), 32, policy=policy)


def test_base64_and_file_url(tmp_path):
    data = encoded("PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    from_url = load_image(image_url=path.as_uri(), image_b64=None, size=16, policy=ImagePolicy(local_root=tmp_path))
    from_b64 = load_image(image_url=None, image_b64=base64.b64encode(data).decode(), size=16, policy=POLICY)
    assert np.array_equal(from_url, from_b64)


@settings(max_examples=150)
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_image_unavailable(raw):
    with contextlib.suppress(ImageUnavailableError):
        assert decode_image(raw, 16, policy=POLICY).shape == (3, 16, 16)


def test_local_paths_from_messages_are_refused_unless_under_the_image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "x.png").write_bytes(encoded("PNG"))
    (tmp_path / "secret.png").write_bytes(encoded("PNG"))
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    for url in (str(root / "x.png"), (root / "x.png").as_uri(), "/etc/shadow", "/proc/self/environ", "/dev/ptmx"):
        with pytest.raises(ImageUnavailableError) as info:  # no root configured: nothing local is even looked at
            load_image(image_url=url, image_b64=None, size=16, policy=POLICY)
        assert info.value.status == "refused", url
    under = ImagePolicy(local_root=root)
    assert load_image(image_url=str(root / "x.png"), image_b64=None, size=16, policy=under).shape == (3, 16, 16)
    for outside in (str(tmp_path / "secret.png"), str(root / "escape.png"), str(root / ".." / "secret.png")):
        with pytest.raises(ImageUnavailableError) as info:
            load_image(image_url=outside, image_b64=None, size=16, policy=under)
        assert info.value.status == "refused", outside


def test_a_pipe_or_device_under_the_root_is_refused_without_waiting(tmp_path):
    import os
    import time

    os.mkfifo(tmp_path / "pipe.png")  # opening a FIFO for reading would wait for a writer forever
    started = time.monotonic()
    with pytest.raises(ImageUnavailableError) as info:
        load_image(
            image_url=str(tmp_path / "pipe.png"), image_b64=None, size=16, policy=ImagePolicy(local_root=tmp_path)
        )
    assert info.value.status == "refused" and time.monotonic() - started < 1.0
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url="/dev/ptmx", image_b64=None, size=16, policy=ImagePolicy(local_root=Path("/")))
    assert info.value.status == "refused" and time.monotonic() - started < 2.0


@pytest.mark.parametrize("url", ["ftp://host/x.jpg", "gopher://host/x", "data:image/png;base64,AAAA", "javascript:x"])
def test_only_http_urls_are_fetched(url):
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=url, image_b64=None, size=16, policy=POLICY)
    assert info.value.status == "unsupported_url"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("240.0.0.1", False),
    ],
)
def test_only_public_addresses_count_as_public(address, public):
    assert _is_public(ipaddress.ip_address(address)) == public


def test_the_inline_image_is_bounded_before_decoding():
    huge = base64.b64encode(b"x" * 2048).decode()
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=None, image_b64=huge, size=16, policy=ImagePolicy(max_bytes=1024))
    assert info.value.status == "too_large"
