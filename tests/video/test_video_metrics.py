"""Offline video metrics: Frechet distances that vanish for a set against itself and grow with known
perturbations, a video feature space in which temporally broken clips are far from real ones, classifier
folders that round-trip, the train-once cache, and the frames-per-second timer.

The fast tests train on `MovingSquares` (below): squares whose side encodes the class, bouncing in a
16x16 frame. The slow test trains the default recipe on MovingDigits and checks the held-out accuracy
documented in scm_mm_video.metrics.
"""

import time

import pytest
import torch
from torch.utils.data import Dataset

from scm_mm.metrics import subset_indices
from scm_mm.metrics.frechet import FeatureStats
from scm_mm_video import metrics
from scm_mm_video.metrics import (
    FrameClassifier,
    VideoClassifier,
    all_frames,
    broken_order,
    cached_video_classifiers,
    classifier_accuracy,
    evaluate_video,
    frames_per_second,
    reference_features,
    train_frame_classifier,
    train_video_classifier,
    video_scores,
)


class MovingSquares(Dataset):
    """Item i: a bright square of side 2 + 2 * class (class i % 3) bouncing in a 16x16 frame, (1, 5, 16, 16)."""

    num_classes = 3

    def __init__(self, size: int = 96, seed: int = 0, frames: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.clips, self.labels = [], []
        for i in range(size):
            label = i % 3
            side = 2 + 2 * label
            room = 16 - side
            start = torch.rand(2, generator=g) * room
            sign = torch.randint(2, (2,), generator=g) * 2 - 1
            velocity = sign * (2 + torch.rand(2, generator=g))  # 2..3 pixels per frame along each axis
            clip = torch.zeros(1, frames, 16, 16, dtype=torch.uint8)
            for t in range(frames):
                p = (start + velocity * t) % (2 * room)
                y, x = torch.where(p > room, 2 * room - p, p).round().long().tolist()
                clip[0, t, y : y + side, x : x + side] = 255
            self.clips.append(clip)
            self.labels.append(label)
        self.fingerprint = f"moving-squares:size={size}:seed={seed}:frames={frames}"

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.clips[i], self.labels[i]


def stack(dataset: Dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def nets() -> tuple[VideoClassifier, FrameClassifier]:
    data = MovingSquares(size=96)
    video = train_video_classifier(data, 3, steps=100, batch_size=16, width=8)
    frame = train_frame_classifier(data, 3, steps=30, batch_size=16, width=8)
    return video, frame


def test_the_classifiers_learn_the_squares(nets):
    accuracy = classifier_accuracy(MovingSquares(size=60, seed=1), *nets)
    assert accuracy["video"] > 0.85 and accuracy["frame"] > 0.9  # chance: 1/3


def test_a_set_against_itself_scores_zero_and_noise_raises_both_distances(nets):
    reference = MovingSquares(size=60, seed=1)
    clips = stack(reference)
    same = evaluate_video(clips, reference, *nets)
    assert abs(same["fvd"]) < 1e-6 and abs(same["frame_fd"]) < 1e-6
    assert same["precision"] == same["recall"] == 1.0
    real = reference_features(reference, *nets)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clips.shape, generator=g)
    scores = [video_scores((clips + a * noise).clamp(0, 255).to(torch.uint8), real, *nets) for a in (8, 32, 128)]
    assert 0 < scores[0]["fvd"] < scores[1]["fvd"] < scores[2]["fvd"]
    assert 0 < scores[0]["frame_fd"] < scores[1]["frame_fd"] < scores[2]["frame_fd"]


def test_scores_gathered_from_two_shares_are_the_scores_of_the_whole_set(nets):
    """video_scores on one share with a `gather` that adds the other share's rows (as Shards.gather does
    across processes) scores the whole set: clip features, logits and per-frame features in clip order."""
    reference = MovingSquares(size=30, seed=1)
    real = reference_features(reference, *nets)
    clips = stack(MovingSquares(size=12, seed=2))
    first, second = clips[:7], clips[7:]
    rows_of_second: list[torch.Tensor] = []
    video_scores(second, real, *nets, gather=lambda rows: rows_of_second.append(rows) or rows)
    others = iter(rows_of_second)
    gathered = video_scores(first, real, *nets, gather=lambda rows: torch.cat([rows, next(others)]))
    whole = video_scores(clips, real, *nets)
    assert len(rows_of_second) == 3 and rows_of_second[2].shape[:2] == second.shape[:1] + second.shape[2:3]
    for key, value in whole.items():
        assert gathered[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_frechet_distance_of_shifted_features_is_the_squared_shift():
    # The formula the metrics call (FeatureStats.frechet_distance), against the analytic value.
    x = torch.randn(500, 16, dtype=torch.float64)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    d = FeatureStats().update(x).frechet_distance(FeatureStats().update(x + shift))
    assert d == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_shuffled_clips_are_farther_than_an_independent_real_sample(nets):
    reference, other = MovingSquares(size=90, seed=1), MovingSquares(size=90, seed=2)
    real = reference_features(reference, *nets)
    clips = stack(other)
    shuffled = broken_order(clips, torch.Generator().manual_seed(0), ("shuffle",))
    independent, broken = video_scores(clips, real, *nets), video_scores(shuffled, real, *nets)
    assert broken["fvd"] > 5 * independent["fvd"]
    # Same frames, so the per-frame distance cannot tell them apart.
    assert broken["frame_fd"] == pytest.approx(independent["frame_fd"], rel=1e-6)


def test_broken_order_permutes_frames_and_never_keeps_the_order():
    clips = torch.arange(6 * 7, dtype=torch.uint8).view(6, 1, 7, 1, 1).expand(6, 1, 7, 2, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    for kinds in (("shuffle",), ("reverse",), ("shuffle", "reverse")):
        out = broken_order(clips, g, kinds)
        order = out[:, 0, :, 0, 0].long() - clips[:, 0, :1, 0, 0].long()  # (B, T) the frame indices used
        assert torch.equal(order.sort(1).values, torch.arange(7).expand(6, 7))
        is_reversed = (order == torch.arange(6, -1, -1)).all(1)
        assert not (order == torch.arange(7)).all(1).any()
        assert is_reversed.all() if kinds == ("reverse",) else True
        assert not is_reversed.any() if kinds == ("shuffle",) else True
    with pytest.raises(ValueError, match="kinds"):
        broken_order(clips, g, ("jumble",))


def test_classifiers_round_trip_through_folders(nets, tmp_path):
    video, frame = nets
    clips = stack(MovingSquares(size=8, seed=3))
    video.save(tmp_path / "video")
    frame.save(tmp_path / "frame")
    video2, frame2 = VideoClassifier.load(tmp_path / "video"), FrameClassifier.load(tmp_path / "frame")
    assert video2.settings == video.settings and not video2.training
    for a, b in zip(video(clips), video2(clips), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(frame(all_frames(clips)), frame2(all_frames(clips)), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="FrameClassifier"):
        VideoClassifier.load(tmp_path / "frame")


def test_cached_video_classifiers_train_once_then_load(tmp_path, monkeypatch):
    trained = []

    def quick(train):
        def run(data, num_classes):
            trained.append(train.__name__)
            return train(data, num_classes, steps=2, batch_size=4, width=8)
        return run

    monkeypatch.setattr(metrics, "train_video_classifier", quick(train_video_classifier))
    monkeypatch.setattr(metrics, "train_frame_classifier", quick(train_frame_classifier))
    data = MovingSquares(size=12)
    clips = stack(data)
    video, frame = cached_video_classifiers(data, tmp_path)
    assert trained == ["train_video_classifier", "train_frame_classifier"]
    video2, frame2 = cached_video_classifiers(data, tmp_path)
    assert len(trained) == 2 and torch.equal(video(clips)[0], video2(clips)[0])
    assert torch.equal(frame(all_frames(clips))[0], frame2(all_frames(clips))[0])
    cached_video_classifiers(MovingSquares(size=12, seed=5), tmp_path)  # other data: trained anew
    assert len(trained) == 4
    video.save(tmp_path / "given" / "video")
    frame.save(tmp_path / "given" / "frame")
    video3, _ = cached_video_classifiers(data, None, path=tmp_path / "given")
    assert len(trained) == 4 and torch.equal(video(clips)[1], video3(clips)[1])


def test_scores_refuse_floats_and_clips_of_another_size(nets):
    reference = MovingSquares(size=12)
    clips = stack(reference)
    with pytest.raises(TypeError, match="uint8"):
        evaluate_video(clips.float() / 127.5 - 1, reference, *nets)
    with pytest.raises(ValueError, match="reference"):
        evaluate_video(clips[:, :, :3], reference, *nets)


class ByClass(Dataset):
    """`per_class` constant clips of each class, listed class by class (as VideoFolder lists UCF-101); records
    which items were read."""

    def __init__(self, classes: int = 3, per_class: int = 10) -> None:
        self.labels = [i // per_class for i in range(classes * per_class)]
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.read.append(i)
        return torch.full((1, 3, 8, 8), 20 * self.labels[i], dtype=torch.uint8), self.labels[i]


def test_the_reference_set_is_a_seeded_random_subset_not_the_first_clips():
    data = ByClass(classes=3, per_class=10)
    nets = VideoClassifier(width=4).eval(), FrameClassifier(width=4).eval()
    real = reference_features(data, *nets, max_reference=9)
    chosen = sorted(data.read)
    assert {data.labels[i] for i in chosen} == {0, 1, 2}  # the first 9 would all be class 0
    assert real["indices"].tolist() == chosen and len(set(chosen)) == 9
    data.read.clear()
    again = reference_features(data, *nets, max_reference=9)  # deterministic: the same clips, the same features
    assert sorted(data.read) == chosen and torch.equal(again["video"], real["video"])
    assert reference_features(data, *nets, max_reference=9, seed=1)["indices"].tolist() != chosen
    assert reference_features(data, *nets, max_reference=99)["indices"].tolist() == list(range(30))
    scores = evaluate_video(torch.stack([data[i][0] for i in range(4)]), data, *nets, max_reference=9)
    assert (scores["reference_clips"], scores["reference_seed"]) == (9, 0)
    # UCF-101's shape: 101 classes listed in order, 2,000 of ~9.5k clips; the first 2,000 span 22 classes.
    labels = subset_indices(101 * 95, 2000) // 95
    assert len(labels.unique()) == 101 and torch.equal(labels, subset_indices(101 * 95, 2000) // 95)


def test_reference_features_are_kept_once_per_data_clips_and_nets(tmp_path):
    data = ByClass(classes=3, per_class=10)
    data.fingerprint = "by-class-30"
    nets = VideoClassifier(width=4).eval(), FrameClassifier(width=4).eval()
    real = reference_features(data, *nets, max_reference=9, cache_dir=tmp_path)
    kept = reference_features(data, *nets, max_reference=9, cache_dir=tmp_path)  # read from the cache
    assert len(data.read) == 9 and all(torch.equal(kept[k], v) for k, v in real.items())
    reference_features(data, VideoClassifier(width=4).eval(), nets[1], max_reference=9, cache_dir=tmp_path)
    assert len(data.read) == 18 and len(list(tmp_path.iterdir())) == 2  # other weights: computed and kept


def test_reference_features_are_read_in_batches_and_equal_the_stacked_ones():
    """reference_features reads and featurises batch_size clips at a time (was: all max_reference clips
    stacked at once), and its features are those of the whole stack, bit for bit: the clips in chunks of
    batch_size, the frames regrouped into chunks of frame_batch_size across clip batches."""
    data = ByClass(classes=3, per_class=50)  # 150 clips: two batches of the default 100
    video_net, frame_net = VideoClassifier(width=4).eval(), FrameClassifier(width=4).eval()
    clips = torch.stack([data[i][0] for i in subset_indices(150, 150).tolist()])
    seen = []  # (clips read so far, clips in this forward pass)
    forward = video_net.forward
    video_net.forward = lambda media: (seen.append((len(data.read), len(media))), forward(media))[1]
    data.read.clear()
    real = reference_features(data, video_net, frame_net)
    assert seen == [(100, 100), (150, 50)]  # the first batch is scored before the rest is read
    assert torch.equal(real["video"], metrics.extract_features(video_net, clips, 100)[0])
    assert torch.equal(real["frame"], metrics.extract_features(frame_net, all_frames(clips), 500)[0])
    assert real["shape"].tolist() == [1, 3, 8, 8]
    # Distinct frames, and batches of 4 clips x 5 frames that chunks of 7 frames straddle.
    squares = MovingSquares(size=11, seed=3)
    small = reference_features(squares, video_net, frame_net, batch_size=4, frame_batch_size=7)
    clips = torch.stack([squares[i][0] for i in small["indices"].tolist()])
    assert torch.equal(small["video"], metrics.extract_features(video_net, clips, 4)[0])
    assert torch.equal(small["frame"], metrics.extract_features(frame_net, all_frames(clips), 7)[0])


def test_frames_per_second_is_frames_over_the_median_call():
    delays = iter([0.5, 0.3, 0.01, 0.01])  # a slow warmup, one slow timed call, two fast ones

    def fn():
        time.sleep(next(delays))

    fps = frames_per_second(fn, frames_per_call=4, repeats=3)
    assert 4 / 0.03 < fps <= 4 / 0.01


@pytest.mark.slow
def test_moving_digits_recipe_accuracy():
    """The numbers documented in train_video_classifier (~80 s on one thread)."""
    from scm_mm_video.data import MovingDigits

    train, test = MovingDigits(size=2000), MovingDigits(size=1000, split="test")
    accuracy = classifier_accuracy(test, train_video_classifier(train, 10), train_frame_classifier(train, 10))
    print(accuracy)
    assert accuracy["video"] > 0.9 and accuracy["frame"] > 0.95
    assert accuracy["order_true"] > 0.95 and accuracy["order_shuffle"] > 0.95
