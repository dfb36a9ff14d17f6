"""Shared test setup: offline Hugging Face, a temporary Flower home, no telemetry."""

import os
import tempfile

_scratch = tempfile.mkdtemp(prefix="safedlora-tests-")
for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": os.path.join(_scratch, "hf"),
    "FLWR_HOME": os.path.join(_scratch, "flwr"),
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs real Flower simulations (slow, minutes)")
    config.addinivalue_line("markers", "deployment: starts real SuperLink/SuperNode processes on loopback")
    config.addinivalue_line("markers", "compose: runs docker/compose.yml on a real Docker engine")
    config.addinivalue_line("markers", "arm64: an emulated arm64 SuperNode (opt-in, SAFEDLORA_ARM64_ROOTFS)")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """An imagefolder of real handwritten digits (scikit-learn's 8x8 scans, upscaled to 32x32)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for digit, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir()
        for k, index in enumerate(np.flatnonzero(digits.target == digit)[:40]):
            pixels = (digits.images[index] * 15).astype(np.uint8).repeat(4, 0).repeat(4, 1)
            Image.fromarray(pixels).convert("RGB").save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A small random ViT saved like a hub checkpoint (the hub's ViTs load through the same code)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
