"""A picture of a plan: the image with every view's box labelled, and below it the views as the
encoder receives them (``hires plan IMG --out plan.png``)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from ..plan.types import Plan, View

ROLE_COLOURS = {
    "slice": (230, 57, 70), "overview": (29, 53, 87), "base": (29, 53, 87), "tile": (230, 57, 70),
    "local": (230, 57, 70), "global": (42, 157, 143), "thumbnail": (29, 53, 87),
    "highres": (230, 57, 70), "lowres": (42, 157, 143), "image": (230, 57, 70),
}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_plan(img: Image.Image, plan: Plan, *, width: int = 1200, thumb_height: int = 150) -> Image.Image:
    """Compose the overlay picture (RGB) for ``img`` (the decoded image) and its ``plan``."""
    from .render import denormalize, render  # torch only when a picture is asked for

    views = render(img, plan)
    W, H = img.size
    scale = min(width / W, 900 / H)
    shown = img.resize((max(1, round(W * scale)), max(1, round(H * scale))), Image.Resampling.BILINEAR)
    font, small = _font(16), _font(12)

    # the views, wrapped in rows under the image
    thumbs: list[tuple[int, View, Image.Image]] = []
    for i, (v, t) in enumerate(zip(plan.views, views)):
        pic = denormalize(t)
        k = min(thumb_height / pic.height, (width - 20) / pic.width)
        size = (max(1, round(pic.width * k)), max(1, round(pic.height * k)))
        thumbs.append((i, v, pic.resize(size, Image.Resampling.BILINEAR)))
    rows: list[list[tuple[int, View, Image.Image]]] = []
    row: list[tuple[int, View, Image.Image]] = []
    x = 10
    for item in thumbs:
        if row and x + item[2].width > width - 10:
            rows.append(row)
            row, x = [], 10
        row.append(item)
        x += item[2].width + 10
    if row:
        rows.append(row)
    header = 52
    strip_h = sum(max(t[2].height for t in r) + 28 for r in rows) + 10
    out = Image.new("RGB", (max(width, shown.width) + 20, header + shown.height + 20 + strip_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    grid = "x".join(map(str, plan.grid)) if plan.grid else "none"
    d.text((10, 8), f"{plan.method}  image {W}x{H}  grid {grid}  views {len(plan.views)}  "
                    f"visual tokens {plan.num_visual_tokens}", fill=(0, 0, 0), font=font)
    d.text((10, 30), "boxes: region of the image each view shows; below: the views as the encoder receives them",
           fill=(90, 90, 90), font=small)
    ox, oy = 10, header
    out.paste(shown, (ox, oy))
    for i, v in enumerate(plan.views):
        if v.box is None:
            continue
        c = ROLE_COLOURS.get(v.role, (0, 0, 0))
        x0, y0, x1, y1 = (ox + v.box[0] * scale, oy + v.box[1] * scale, ox + v.box[2] * scale, oy + v.box[3] * scale)
        whole = v.box[0] <= 0.5 and v.box[1] <= 0.5 and v.box[2] >= W - 0.5 and v.box[3] >= H - 0.5
        d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=c, width=1 if whole else 3)
        if not whole:
            d.text((x0 + 4, y0 + 3), f"{i} {v.role}", fill=c, font=small, stroke_width=2, stroke_fill=(255, 255, 255))
    y = oy + shown.height + 20
    for r in rows:
        x = 10
        for i, v, pic in r:
            c = ROLE_COLOURS.get(v.role, (0, 0, 0))
            label = f"{i} {v.role} {v.size[0]}x{v.size[1]}"
            if v.stride:
                label += f" [{v.stride[2]}::{v.stride[0]},{v.stride[1]}::{v.stride[0]}]"
            d.text((x, y), label, fill=c, font=small)
            out.paste(pic, (x, y + 16))
            d.rectangle((x - 1, y + 15, x + pic.width, y + 16 + pic.height), outline=c, width=1)
            x += pic.width + 10
        y += max(t[2].height for t in r) + 28
    return out
