"""Silhouettes of the generated products: one shape family per subCategory, one variant per articleType.

A shape is a list of primitives in a unit box (x right, y down, both 0..1), which `render` scales and draws:
  ("poly", points) | ("ellipse", box) | ("rect", box) | ("line", points, width_in_base_pixels)
"""

from __future__ import annotations

from functools import cache

from fashion_tagger.data.synthetic import tables

Point = tuple[float, float]
Box = tuple[float, float, float, float]
Primitive = tuple[str, list[Point]] | tuple[str, Box] | tuple[str, list[Point], float]

# subCategory -> silhouette family; articleTypes of a family differ in proportions and details.
FAMILY_BY_SUBCATEGORY: dict[str, str] = {
    "Topwear": "top",
    "Loungewear and Nightwear": "top",
    "Apparel Set": "top",
    "Innerwear": "inner",
    "Bottomwear": "bottom",
    "Dress": "dress",
    "Saree": "dress",
    "Shoes": "shoe",
    "Sandal": "sandal",
    "Flip Flops": "sandal",
    "Socks": "socks",
    "Watches": "watch",
    "Bags": "bag",
    "Wallets": "bag",
    "Eyewear": "eyewear",
    "Belts": "belt",
    "Jewellery": "jewel",
    "Cufflinks": "jewel",
    "Headwear": "cap",
    "Ties": "tie",
    "Scarves": "scarf",
    "Stoles": "scarf",
    "Mufflers": "scarf",
    "Fragrance": "bottle",
    "Perfumes": "bottle",
    "Skin": "bottle",
    "Skin Care": "bottle",
    "Hair": "bottle",
    "Bath and Body": "bottle",
    "Lips": "tube",
    "Makeup": "tube",
    "Nails": "tube",
    "Eyes": "tube",
    "Beauty Accessories": "tube",
}


def shape_of(subcategory: str, article: str) -> tuple[list[Primitive], list[Primitive]]:
    """Body and detail primitives of a product: its family from the subCategory, the variant from the articleType."""
    family = FAMILY_BY_SUBCATEGORY.get(subcategory, "box")
    return _shape(family, _variant_index().get((subcategory, article), 0))


@cache
def _variant_index() -> dict[tuple[str, str], int]:
    """(subCategory, articleType) -> index within its silhouette family, most frequent first (stable)."""
    totals: dict[tuple[str, str], int] = {}
    for _, _, sub, article, n in tables.articles():
        totals[(sub, article)] = totals.get((sub, article), 0) + n
    seen: dict[str, dict[str, int]] = {}
    out = {}
    for sub, article in sorted(totals, key=lambda k: (-totals[k], k)):
        family = FAMILY_BY_SUBCATEGORY.get(sub, "box")
        known = seen.setdefault(family, {})
        out[(sub, article)] = known.setdefault(article, len(known))
    return out


def _detail(kind: int, x0: float, y0: float, x1: float, y1: float) -> list[Primitive]:
    """One of four detail marks inside a part's box: none, centre seam, band, pocket."""
    cx = (x0 + x1) / 2
    if kind == 1:
        return [("line", [(cx, y0 + 0.03), (cx, y1 - 0.03)], 1.4)]
    if kind == 2:
        h = (y1 - y0) * 0.12
        return [("rect", (x0, y1 - 2 * h, x1, y1 - h))]
    if kind == 3:
        w, h = (x1 - x0) * 0.22, (y1 - y0) * 0.16
        return [("rect", (cx + w * 0.2, y0 + h, cx + w * 1.2, y0 + 2.2 * h))]
    return []


def _shape(family: str, k: int) -> tuple[list[Primitive], list[Primitive]]:
    """Body and detail primitives of variant k of a family; a, b, c pick proportions and details."""
    a, b, c = k % 3, k % 4, (k // 3) % 2
    body: list[Primitive]
    if family == "top":
        length = (0.62, 0.78, 1.0)[a]
        w = (0.24, 0.28, 0.22)[c * 2 if b == 3 else c]
        yb = 0.08 + 0.9 * length
        body = [("poly", [(0.5 - w, 0.08), (0.5 + w, 0.08), (0.5 + w, yb), (0.5 - w, yb)])]
        sl = 0.35 if c == 0 else 0.85
        for s in (-1, 1):
            xs = 0.5 + s * w
            body.append(
                ("poly", [(xs, 0.08), (xs + s * 0.22, 0.08 + sl * 0.6), (xs + s * 0.1, 0.1 + sl * 0.65), (xs, 0.3)])
            )
        return body, [("ellipse", (0.42, 0.04, 0.58, 0.14)), *_detail(b, 0.5 - w, 0.12, 0.5 + w, yb)]
    if family == "dress":
        length = (1.0, 0.8, 0.9)[a]
        flare = (0.42, 0.3, 0.48)[b % 3]
        yb = 0.06 + 0.92 * length
        body = [("poly", [(0.36, 0.06), (0.64, 0.06), (0.5 + flare, yb), (0.5 - flare, yb)])]
        return body, _detail(b, 0.5 - flare / 2, 0.2, 0.5 + flare / 2, yb)
    if family == "bottom":
        length = (1.0, 0.45, 0.85)[a]
        spread = (0.0, 0.08, -0.04)[b % 3]
        yb = 0.14 + 0.84 * length
        body = [("rect", (0.24, 0.04, 0.76, 0.14))]
        body.append(("poly", [(0.24, 0.14), (0.5, 0.14), (0.47, yb), (0.25 - spread, yb)]))
        body.append(("poly", [(0.5, 0.14), (0.76, 0.14), (0.75 + spread, yb), (0.53, yb)]))
        return body, _detail(b, 0.26, 0.04, 0.74, 0.5)
    if family == "inner":
        if a == 0:
            body = [("poly", [(0.18, 0.3), (0.82, 0.3), (0.82, 0.42), (0.58, 0.7), (0.42, 0.7), (0.18, 0.42)])]
        elif a == 1:
            body = [("ellipse", (0.16, 0.3, 0.5, 0.58)), ("ellipse", (0.5, 0.3, 0.84, 0.58))]
            body.append(("line", [(0.3, 0.32), (0.3, 0.1)], 2))
            body.append(("line", [(0.7, 0.32), (0.7, 0.1)], 2))
        else:
            body = [("rect", (0.26, 0.22, 0.74, 0.92)), ("line", [(0.32, 0.22), (0.32, 0.05)], 3)]
            body.append(("line", [(0.68, 0.22), (0.68, 0.05)], 3))
        return body, _detail(b, 0.3, 0.32, 0.7, 0.6)
    if family == "shoe":
        heel = (0.0, 0.07, 0.28)[a]
        toe = (0.1, 0.16, 0.04)[b % 3]
        ys = 0.72
        body = [("rect", (0.06, ys, 0.94, ys + 0.08 + heel * 0.3))]
        body.append(("poly", [(0.06, ys - 0.22 - heel), (0.42, ys - 0.2 - heel), (0.94 - toe, ys - 0.1), (0.94, ys)]))
        body.append(("poly", [(0.06, ys - 0.22 - heel), (0.94, ys), (0.06, ys)]))
        if heel > 0.2:
            body.append(("rect", (0.06, ys, 0.16, ys + 0.22)))
        return body, _detail(b, 0.3, ys - 0.2 - heel / 2, 0.7, ys)
    if family == "sandal":
        body = [("rect", (0.08, 0.66, 0.92, 0.74))]
        if a == 0:  # flip flop: a V strap
            body += [("line", [(0.3, 0.66), (0.55, 0.45), (0.8, 0.66)], 3)]
        else:
            for x in (0.3, 0.5, 0.7)[: a + 1]:
                body.append(("line", [(x - 0.08, 0.66), (x + 0.05, 0.42), (x + 0.12, 0.66)], 2.5))
        return body, _detail(b, 0.2, 0.58, 0.8, 0.74)
    if family == "socks":
        length = (0.6, 0.35, 0.8)[a]
        y0 = 0.75 - length
        body = [("poly", [(0.3, y0), (0.58, y0), (0.58, 0.7), (0.8, 0.72), (0.8, 0.88), (0.3, 0.88)])]
        return body, _detail(b, 0.3, y0, 0.58, 0.6)
    if family == "watch":
        r = (0.26, 0.3, 0.22)[a]
        band = (0.18, 0.26, 0.12)[b % 3]
        body = [
            ("rect", (0.5 - band, 0.0, 0.5 + band, 1.0)),
            ("ellipse", (0.5 - r, 0.5 - r * 0.75, 0.5 + r, 0.5 + r * 0.75)),
        ]
        return body, [("line", [(0.5, 0.5), (0.5, 0.5 - r * 0.55), (0.5, 0.5), (0.5 + r * 0.5, 0.5)], 1.5)]
    if family == "bag":
        w, h = ((0.8, 0.5), (0.6, 0.75), (0.9, 0.32))[a]
        w, h = (w * (1.0 - 0.08 * c), h * (1.0 - 0.1 * (b == 3)))
        y1 = 0.92
        body = [
            ("poly", [(0.5 - w / 2 + 0.05, y1 - h), (0.5 + w / 2 - 0.05, y1 - h), (0.5 + w / 2, y1), (0.5 - w / 2, y1)])
        ]
        if b != 1:
            top = y1 - h
            body.append(("line", [(0.35, top), (0.4, top - 0.18), (0.6, top - 0.18), (0.65, top)], 2.5))
        return body, _detail(b, 0.5 - w / 2, y1 - h, 0.5 + w / 2, y1)
    if family == "eyewear":
        r = (0.19, 0.21, 0.17)[a]
        body = [
            ("ellipse", (0.5 - 0.03 - 2 * r, 0.4, 0.47, 0.4 + 1.4 * r)),
            ("ellipse", (0.53, 0.4, 0.53 + 2 * r, 0.4 + 1.4 * r)),
        ]
        body.append(("line", [(0.44, 0.44), (0.56, 0.44)], 2))
        return body, _detail(b, 0.1, 0.4, 0.9, 0.4 + 1.4 * r)
    if family == "belt":
        h = (0.12, 0.09, 0.15)[a]
        body = [("rect", (0.0, 0.5 - h / 2, 1.0, 0.5 + h / 2)), ("rect", (0.12, 0.5 - h, 0.3, 0.5 + h))]
        return body, _detail(b, 0.35, 0.5 - h / 2, 0.95, 0.5 + h / 2)
    if family == "jewel":
        if a == 0:
            body = [("ellipse", (0.28, 0.34, 0.72, 0.66))]
        elif a == 1:
            body = [("ellipse", (0.2, 0.45, 0.4, 0.65)), ("ellipse", (0.6, 0.45, 0.8, 0.65))]
            body += [("line", [(0.3, 0.45), (0.3, 0.3)], 1.5), ("line", [(0.7, 0.45), (0.7, 0.3)], 1.5)]
        else:
            body = [("line", [(0.2, 0.1), (0.5, 0.55), (0.8, 0.1)], 1.5), ("ellipse", (0.4, 0.5, 0.6, 0.72))]
        return body, _detail(b, 0.3, 0.35, 0.7, 0.7)
    if family == "cap":
        top = (0.3, 0.2, 0.35)[a]
        body = [("ellipse", (0.2, top, 0.8, 0.7 + (0.7 - top) * 0.2)), ("rect", (0.2, 0.6, 0.95 - 0.1 * c, 0.68))]
        return body, _detail(b, 0.25, top, 0.75, 0.6)
    if family == "tie":
        w = (0.1, 0.14, 0.07)[a]
        body = [("poly", [(0.5 - w / 2, 0.05), (0.5 + w / 2, 0.05), (0.5 + w, 0.85), (0.5, 0.95), (0.5 - w, 0.85)])]
        return body, _detail(b, 0.5 - w, 0.2, 0.5 + w, 0.8)
    if family == "scarf":
        w = (0.3, 0.22, 0.4)[a]
        body = [("poly", [(0.5 - w, 0.05), (0.5 + w, 0.05), (0.5 + w * 0.8, 0.95), (0.5 - w * 1.2, 0.95)])]
        return body, _detail(b, 0.5 - w, 0.1, 0.5 + w, 0.9)
    if family == "bottle":
        w, h = ((0.3, 0.6), (0.4, 0.4), (0.2, 0.75))[a]
        w *= 1.0 - 0.1 * c
        y0 = 0.95 - h
        body = [("rect", (0.5 - w / 2, y0, 0.5 + w / 2, 0.95)), ("rect", (0.5 - w / 6, y0 - 0.12, 0.5 + w / 6, y0))]
        return body, _detail(b, 0.5 - w / 2, y0, 0.5 + w / 2, 0.95)
    if family == "tube":
        if a == 2:
            body = [("ellipse", (0.2, 0.45, 0.8, 0.75))]
        else:
            w = (0.14, 0.24)[a]
            body = [
                ("rect", (0.5 - w / 2, 0.3, 0.5 + w / 2, 0.9)),
                ("rect", (0.5 - w / 3, 0.15 + 0.1 * c, 0.5 + w / 3, 0.3)),
            ]
        return body, _detail(b, 0.35, 0.4, 0.65, 0.85)
    w, h = ((0.6, 0.6), (0.8, 0.4), (0.45, 0.8))[a]
    body = [("rect", (0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2))]
    return body, _detail(b, 0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2)
