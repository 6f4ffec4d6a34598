"""Views that carry their image's identity, for the pipeline order tests: every crop of image
``i`` is filled with the image's first pixel value. NumPy only, so the pipeline's worker
processes can import it cheaply."""

import numpy as np


class IdentityViews:
    global_crops_number = 2
    local_crops_number = 0
    global_crop_size = 4
    local_crop_size = 4

    def __call__(self, image, rng):
        value = float(np.asarray(image)[0, 0, 0])
        crop = np.full((self.global_crop_size, self.global_crop_size, 3), value, np.float32)
        rng.random()  # consume the stream as a real recipe would
        return [crop, crop], []


def id_images(count, size=6):
    """``count`` uint8 images, image ``i`` filled with ``i``."""
    return np.repeat(np.arange(count, dtype=np.uint8), size * size * 3).reshape(count, size, size, 3)
