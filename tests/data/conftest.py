"""Real images for data tests: the photographs and scans shipped in scikit-image's data folder."""

import glob
import os

import pytest


def real_image_paths():
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.endswith((".png", ".jpg", ".jpeg")))


@pytest.fixture(scope="session")
def real_images():
    paths = real_image_paths()
    assert len(paths) >= 20, "scikit-image's data folder should hold its sample images"
    return paths


@pytest.fixture(scope="session")
def tokenizer():
    from megatron_moca.data.tokenizer import QwenTokenizer

    return QwenTokenizer()
