"""The domain CLIP for digits (genlab.metrics.train_clip): the bundled open_clip folder loads
through the same path as any open_clip model and reads real MNIST test digits zero-shot from
caption templates it never saw; the training script writes a folder that loads."""

from __future__ import annotations

import json

import pytest
import torch

from genlab.data import MNISTDataModule, to_model
from genlab.metrics import train_clip
from genlab.metrics.clip import CLIPScore
from genlab.metrics.clip_loader import BUNDLED, load_clip

from .conftest import SHARED

needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").exists(), reason="needs ../shared/assets/mnist"
)


@pytest.fixture(scope="module")
def mnist_test():
    dm = MNISTDataModule(root=str(SHARED / "mnist"), download=False, cache_dir=None)
    images, labels = dm.read_split("test")
    return to_model(images[:1000]), labels[:1000]


@needs_mnist
def test_bundled_domain_clip_reads_digits_from_unseen_templates(mnist_test):
    images, labels = mnist_test
    clip = CLIPScore("genlab-digits")
    assert clip.protocol()["weights_file"].endswith("digits_clip/open_clip_model.safetensors")
    accuracy = train_clip.zero_shot_accuracy(
        clip.model, clip.tokenizer, images, labels, train_clip.HELD_OUT_TEMPLATES
    )
    assert accuracy > 0.9, accuracy  # 10 classes: chance is 0.1
    # the CLIP score path (its own preprocessing) agrees: the right digit's prompt wins
    words = train_clip.WORDS
    cos = torch.stack([clip.cosine(images, f"this is a {k}") for k in range(10)], 1)
    assert (cos.argmax(1) == labels).float().mean() > 0.9
    right = clip.score(images, [f"a scan of the numeral {words[k]}" for k in labels.tolist()])
    wrong = clip.score(images, [f"a scan of the numeral {words[(k + 3) % 10]}" for k in labels])
    assert right > wrong + 30


def test_bundled_results_record_the_zero_shot_accuracy():
    results = json.loads((BUNDLED["genlab-digits"] / "results.json").read_text())
    assert results["zero_shot_accuracy_held_out_templates"] > 0.9
    assert not set(results["held_out_templates"]) & set(results["train_templates"])


@needs_mnist
def test_training_script_writes_a_folder_that_loads(tmp_path):
    out = tmp_path / "clip"
    results = train_clip.main(
        [f"data_dir={SHARED / 'mnist'}", "epochs=1", "limit=512", f"out={out}"]
    )
    assert results["steps"] == 2 and 0 <= results["zero_shot_accuracy_held_out_templates"] <= 1
    model, tokenizer, info = load_clip(f"local-dir:{out}")
    assert info["weights_file"].endswith("open_clip_model.safetensors")
    state = train_clip.build()[0].state_dict()
    assert set(model.state_dict()) == set(state)  # open_clip's own CLIP class, all weights
    assert tokenizer(["a handwritten seven"]).shape == (1, 16)
