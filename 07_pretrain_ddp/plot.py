"""A loss curve as a PNG without matplotlib: draw into a numpy image, encode it with zlib and struct.

    PNG = signature, IHDR (width, height, 8-bit RGB), IDAT (zlib of each row prefixed by filter 0), IEND
    every chunk = length (4 bytes) | type (4) | data | crc32(type + data)

Axes are a box with 10 tick marks each; the numbers at the corners are drawn with a 3x5 pixel font
(digits and '.' only). Left out on purpose: legends and labels in words, antialiasing, log scales.

Demo: python 07_pretrain_ddp/plot.py   (writes /tmp/lillm_plot_demo.png)
"""

import struct
import zlib

import numpy as np

FONT = {  # 3 x 5 pixels per glyph, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010",
}


def write_png(path, image: np.ndarray) -> None:
    """image (H, W, 3) uint8 -> an 8-bit RGB PNG file."""
    H, W, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(H))  # filter type 0 (none) on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)  # width, height, bit depth 8, colour type 2 (RGB)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def draw_text(image, text: str, x: int, y: int, scale: int = 2, color=(0, 0, 0)) -> None:
    for i, ch in enumerate(text):
        glyph = np.array([int(b) for b in FONT[ch]], dtype=bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
        x0 = x + i * 4 * scale
        image[y : y + 5 * scale, x0 : x0 + 3 * scale][glyph] = color


def draw_line(image, x0, y0, x1, y1, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs, ys = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
    for d in range(width):
        image[np.clip(ys + d, 0, image.shape[0] - 1), np.clip(xs, 0, image.shape[1] - 1)] = color


def plot_curves(path, curves, width: int = 800, height: int = 500) -> None:
    """curves: list of (xs, ys, (r, g, b)). x runs from 0 to the largest x, y over the range of all ys."""
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 60, width - 20, 20, height - 40  # the plot box, in pixels
    xs_all = [x for xs, _, _ in curves for x in xs] or [1]
    ys_all = [y for _, ys, _ in curves for y in ys] or [0, 1]
    x_max, y_min, y_max = max(max(xs_all), 1), min(ys_all), max(ys_all)
    if y_max == y_min:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    px = lambda x: left + (right - left) * x / x_max  # noqa: E731 (data -> pixel)
    py = lambda y: bottom - (bottom - top) * (y - y_min) / (y_max - y_min)  # noqa: E731
    for x0, y0, x1, y1 in [(left, top, right, top), (left, bottom, right, bottom), (left, top, left, bottom), (right, top, right, bottom)]:
        draw_line(image, x0, y0, x1, y1, (0, 0, 0), width=1)
    for i in range(11):
        draw_line(image, left + (right - left) * i / 10, bottom, left + (right - left) * i / 10, bottom + 5, (0, 0, 0), 1)
        draw_line(image, left - 5, top + (bottom - top) * i / 10, left, top + (bottom - top) * i / 10, (0, 0, 0), 1)
    draw_text(image, f"{y_max:.2f}", 4, top - 4)
    draw_text(image, f"{y_min:.2f}", 4, bottom - 6)
    draw_text(image, "0", left - 2, bottom + 10)
    draw_text(image, f"{x_max:g}", right - 8 * len(f"{x_max:g}"), bottom + 10)
    for xs, ys, color in curves:
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            draw_line(image, x0, y0, x1, y1, color)
        if len(points) == 1:
            draw_line(image, *points[0], *points[0], color, width=4)
    write_png(path, image)


if __name__ == "__main__":
    steps = np.arange(1, 201)
    train = 9.0 * np.exp(-steps / 40) + 3.0 + 0.1 * np.sin(steps)
    val_steps = steps[::25]
    plot_curves("/tmp/lillm_plot_demo.png", [(steps, train, (70, 130, 220)), (val_steps, train[::25] + 0.2, (220, 50, 50))])
    with open("/tmp/lillm_plot_demo.png", "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    print(f"wrote /tmp/lillm_plot_demo.png ({len(data):,} bytes): train loss in blue, validation loss in red")
