"""Drawing of one generated product image: every label is visible in the pixels, so a small CNN can learn it.

Silhouette from sub/articleType (`shapes`), fill from baseColour, texture from season, corner marks from gender
and a bottom mark from usage; a pure function of the labels and the seed, at any scale of the 60x80 base.
"""

from __future__ import annotations

import random
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from fashion_tagger.data.synthetic.shapes import shape_of

BASE_W, BASE_H = 60, 80

# RGB of every real baseColour; 'Multi' is drawn as bands of MULTI_BANDS instead.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "Black": (20, 20, 20),
    "White": (250, 250, 250),
    "Blue": (30, 80, 200),
    "Brown": (120, 70, 30),
    "Grey": (128, 128, 128),
    "Red": (210, 30, 30),
    "Green": (30, 150, 50),
    "Pink": (245, 140, 180),
    "Navy Blue": (20, 30, 90),
    "Purple": (120, 40, 150),
    "Silver": (192, 192, 200),
    "Yellow": (245, 220, 30),
    "Beige": (225, 205, 165),
    "Gold": (212, 175, 55),
    "Maroon": (120, 15, 35),
    "Orange": (250, 130, 20),
    "Olive": (110, 115, 35),
    "Multi": (150, 120, 110),
    "Cream": (250, 240, 205),
    "Steel": (110, 125, 140),
    "Charcoal": (55, 60, 65),
    "Peach": (250, 185, 150),
    "Off White": (240, 235, 225),
    "Skin": (230, 180, 145),
    "Lavender": (180, 160, 225),
    "Grey Melange": (165, 165, 160),
    "Khaki": (190, 170, 110),
    "Magenta": (210, 20, 140),
    "Teal": (0, 120, 120),
    "Tan": (205, 160, 110),
    "Mustard": (210, 165, 20),
    "Bronze": (170, 110, 50),
    "Copper": (185, 95, 50),
    "Turquoise Blue": (40, 200, 210),
    "Rust": (170, 65, 20),
    "Burgundy": (90, 10, 30),
    "Metallic": (160, 165, 175),
    "Coffee Brown": (80, 50, 30),
    "Mauve": (175, 120, 150),
    "Rose": (230, 90, 120),
    "Nude": (235, 200, 175),
    "Sea Green": (45, 160, 110),
    "Mushroom Brown": (150, 125, 105),
    "Taupe": (135, 115, 100),
    "Lime Green": (160, 220, 40),
    "Fluorescent Green": (90, 255, 60),
}
MULTI_BANDS = ((210, 30, 30), (30, 80, 200), (245, 220, 30))
OUTLINE_RGB = (175, 175, 175)
MARK_RGB = (45, 45, 45)


@cache
def _season_pattern(season: str, scale: int) -> Image.Image | None:
    """An L mask, a little larger than the image so a random crop jitters the texture's phase."""
    if season == "Summer":
        return None
    h, w = (BASE_H + 8) * scale, (BASE_W + 8) * scale
    yy, xx = np.mgrid[0:h, 0:w] // scale
    if season == "Fall":
        on = (xx + yy) % 6 < 2
    elif season == "Winter":
        on = yy % 4 < 2
    else:
        on = (xx % 5 < 2) & (yy % 5 < 2)
    return Image.fromarray((on * 255).astype(np.uint8), "L")


def _shade(rgb: tuple[int, ...], amount: float) -> tuple[int, ...]:
    """Darker for light colours, lighter for dark ones, so textures and details stay visible on any fill."""
    if sum(rgb) > 3 * 110:
        return tuple(int(v * (1 - amount)) for v in rgb)
    return tuple(int(v + (255 - v) * amount) for v in rgb)


def _draw_primitives(draw: ImageDraw.ImageDraw, prims, to_px, scale: float, fill, grow: float = 0.0) -> None:
    for prim in prims:
        kind = prim[0]
        if kind == "poly":
            pts = [to_px(p) for p in prim[1]]
            draw.polygon(pts, fill=fill)
            if grow:
                draw.line([*pts, pts[0]], fill=fill, width=max(1, round(2 * grow)))
        elif kind in ("ellipse", "rect"):
            x0, y0 = to_px(prim[1][:2])
            x1, y1 = to_px(prim[1][2:])
            # PIL boxes include their far edge: minus one pixel keeps small and full renders the same shape
            left, top = min(x0, x1) - grow, min(y0, y1) - grow
            # ... and a part under a pixel wide (a small render of a thin part) is one pixel, not an inverted box.
            box = (left, top, max(left, max(x0, x1) + grow - 1), max(top, max(y0, y1) + grow - 1))
            (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=fill)
        else:
            width = max(1, round(prim[2] * scale + 2 * grow))
            draw.line([to_px(p) for p in prim[1]], fill=fill, width=width, joint="curve")


def _draw_mark(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, max(cx - r, cx + r - 1), max(cy - r, cy + r - 1))
    if shape == "square":
        draw.rectangle(box, fill=MARK_RGB)
    elif shape == "circle":
        draw.ellipse(box, fill=MARK_RGB)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=MARK_RGB)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=MARK_RGB)
    elif shape == "ring":
        draw.ellipse(box, outline=MARK_RGB, width=max(1, round(r / 2.5)))
    elif shape == "cross":
        w = max(1, round(r / 2))
        draw.line([(cx - r, cy), (cx + r, cy)], fill=MARK_RGB, width=w)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=MARK_RGB, width=w)
    elif shape == "hbar":
        draw.rectangle((cx - r * 1.6, cy - r / 2.5, cx + r * 1.6 - 1, cy + r / 2.5 - 1), fill=MARK_RGB)
    else:  # vbar
        draw.rectangle((cx - r / 2.5, cy - r, cx + r / 2.5 - 1, cy + r - 1), fill=MARK_RGB)


# gender -> corner marks (x, y in base pixels, shape); usage -> a mark at the bottom centre.
GENDER_MARKS = {
    "Men": ((5.5, 5.5, "square"),),
    "Women": ((54.5, 5.5, "circle"),),
    "Unisex": ((5.5, 5.5, "square"), (54.5, 5.5, "circle")),
    "Boys": ((5.5, 74.5, "square"),),
    "Girls": ((54.5, 74.5, "circle"),),
}
USAGE_MARKS = {
    "Casual": "hbar",
    "Sports": "triangle",
    "Ethnic": "diamond",
    "Formal": "square",
    "Smart Casual": "ring",
    "Party": "cross",
    "Travel": "circle",
    "Home": "vbar",
}


def render_image(attrs: dict[str, str], seed: int, scale: int = 1) -> Image.Image:
    """Draw one product: silhouette from sub/articleType, fill from baseColour, texture from season, marks."""
    rng = random.Random(seed)
    w_px, h_px = BASE_W * scale, BASE_H * scale
    canvas = Image.new("RGB", (w_px, h_px), (255, 255, 255))
    mask = Image.new("L", (w_px, h_px), 0)
    draw, mask_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)

    body, details = shape_of(attrs["subCategory"], attrs["articleType"])
    size = rng.uniform(0.92, 1.04)
    bw, bh = 42 * size * scale, 56 * size * scale
    x0 = (30 + rng.uniform(-2, 2)) * scale - bw / 2
    y0 = (40 + rng.uniform(-2, 2)) * scale - bh / 2

    def to_px(p):
        return (x0 + p[0] * bw, y0 + p[1] * bh)

    _draw_primitives(draw, body, to_px, scale, OUTLINE_RGB, grow=0.7 * scale)
    _draw_primitives(mask_draw, body, to_px, scale, 255)

    colour = attrs["baseColour"]
    base = COLOUR_RGB[colour]
    fill = tuple(min(255, max(0, v + rng.randint(-6, 6))) for v in base)
    layer = Image.new("RGB", (w_px, h_px), fill)
    if colour == "Multi":
        band = w_px // 3 + 1
        for j, rgb in enumerate(MULTI_BANDS):
            layer.paste(rgb, (j * band, 0, (j + 1) * band, h_px))
    pattern = _season_pattern(attrs["season"], scale)
    if pattern is not None:
        ox, oy = rng.randrange(6) * scale, rng.randrange(6) * scale
        layer.paste(_shade(fill, 0.3), (0, 0), pattern.crop((ox, oy, ox + w_px, oy + h_px)))
    canvas.paste(layer, (0, 0), mask)
    _draw_primitives(draw, details, to_px, scale, _shade(fill, 0.5))

    for mx, my, shape in GENDER_MARKS[attrs["gender"]]:
        _draw_mark(draw, shape, (mx + rng.uniform(-1, 1)) * scale, (my + rng.uniform(-1, 1)) * scale, 2.6 * scale)
    usage_mark = USAGE_MARKS.get(attrs["usage"], "vbar")
    _draw_mark(
        draw, usage_mark, (30 + rng.uniform(-1.5, 1.5)) * scale, (75 + rng.uniform(-0.5, 0.5)) * scale, 2.6 * scale
    )

    # Light sensor noise, on the base grid so a downscaled full image matches the small one.
    noise = np.random.default_rng(seed).integers(-5, 6, size=(BASE_H, BASE_W, 1), dtype=np.int16)
    if scale != 1:
        noise = noise.repeat(scale, axis=0).repeat(scale, axis=1)
    pixels = np.asarray(canvas, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
