"""cleanplate: RORem-style removal of promo text, watermarks and stickers from product photos.

Core modules: :mod:`cleanplate.imaging` (decode, masks, crop, composite), :mod:`cleanplate.bundle`
(the model bundle), :mod:`cleanplate.pipeline` (4-step LCM removal on crops), :mod:`cleanplate.remover`
(one removal end to end), :mod:`cleanplate.cli` (the ``cleanplate`` command).
"""

__version__ = "0.1.0"
