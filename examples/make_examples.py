"""Writes the README example: scikit-image's coffee photo with a storefront promo stamped on it, and its mask.

    python examples/make_examples.py   # -> examples/coffee_sale.jpg, examples/coffee_sale_mask.png
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data

HERE = Path(__file__).parent


def main() -> None:
    photo = Image.fromarray(data.coffee())  # 600x400 RGB
    layer = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=54)
    draw.text((28, 22), "SALE -30%", font=font, fill=(230, 30, 40, 255), stroke_width=4, stroke_fill=(255, 255, 255, 255))
    small = ImageFont.load_default(size=26)
    draw.text((380, 350), "FREE SHIPPING", font=small, fill=(255, 255, 255, 255), stroke_width=2, stroke_fill=(20, 20, 20, 255))
    source = Image.alpha_composite(photo.convert("RGBA"), layer).convert("RGB")
    mask = (np.asarray(layer)[..., 3] > 8).astype(np.uint8)
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8)) * 255  # cover anti-aliased edges
    source.save(HERE / "coffee_sale.jpg", quality=95)
    Image.fromarray(mask).save(HERE / "coffee_sale_mask.png")


if __name__ == "__main__":
    main()
