"""The decoding steps on hand-made maps whose answers are known: peaks, refinement, PAF scores, grouping."""

import numpy as np
import pytest
import torch

from flexunet.predict import paf
from flexunet.predict.identity import classify_crops, group_by_class
from flexunet.predict.peaks import global_peaks, local_peak_count, local_peaks, top_local_peaks, window_origins
from flexunet.predict.preprocess import Preprocessing, as_frames


def one_map(pixels: dict, h: int = 12, w: int = 14) -> torch.Tensor:
    maps = torch.zeros(1, 1, h, w)
    for (x, y), value in pixels.items():
        maps[0, 0, y, x] = value
    return maps


# (pixels {(x, y): value}, expected peaks (x, y)) with threshold 0.2 and no refinement.
LOCAL_PEAKS = [
    ({(5, 4): 1.0}, [(5, 4)]),
    ({(5, 4): 1.0, (9, 8): 0.5}, [(5, 4), (9, 8)]),
    ({(5, 4): 0.1}, []),  # below the threshold
    ({(5, 4): 1.0, (6, 4): 1.0}, [(5.5, 4)]),  # two-pixel flat top: its mean
    ({(5, 4): 1.0, (5, 5): 1.0, (6, 5): 1.0}, [(16 / 3, 14 / 3)]),  # an L of three
    ({(5, 4): 1.0, (4, 5): 1.0, (5, 5): 1.0}, [(14 / 3, 14 / 3)]),  # the other L
    ({(5, 4): 1.0, (6, 4): 1.0, (5, 5): 1.0, (6, 5): 1.0}, [(5.5, 4.5)]),  # 2x2
    ({(5, 4): 1.0, (6, 4): 1.0, (7, 4): 1.0}, []),  # three wide: no peak
    ({(5, 4): 1.0, (6, 4): 1.0, (7, 5): 2.0}, [(7, 5)]),  # a flat top next to a higher pixel
    ({(0, 0): 1.0, (13, 11): 1.0}, [(0, 0), (13, 11)]),  # corners
]


@pytest.mark.parametrize("pixels, expected", LOCAL_PEAKS)
def test_local_peaks(pixels, expected):
    maps = one_map(pixels)
    points, values, sample, channel = local_peaks(maps, 0.2, refinement=None)
    np.testing.assert_allclose(points.numpy().reshape(-1, 2), np.array(expected, dtype=np.float32).reshape(-1, 2),
                               atol=1e-6)
    assert (sample == 0).all() and (channel == 0).all()
    fixed, fixed_values, _ = top_local_peaks(maps, 8, 0.2, refinement=None)
    found = fixed[0, 0][~torch.isnan(fixed_values[0, 0])].numpy()
    found = found[np.lexsort((found[:, 0], found[:, 1]))]  # raster order, as local_peaks returns them
    np.testing.assert_allclose(found.reshape(-1, 2), np.array(expected, dtype=np.float32).reshape(-1, 2), atol=1e-6)


def test_local_peaks_are_ordered_by_sample_row_column_channel():
    maps = torch.zeros(2, 2, 10, 10)
    maps[1, 0, 2, 7] = maps[0, 1, 5, 1] = maps[0, 0, 5, 1] = maps[0, 0, 1, 8] = 1.0
    _, _, sample, channel = local_peaks(maps, 0.2, refinement=None)
    assert list(zip(sample.tolist(), channel.tolist())) == [(0, 0), (0, 0), (0, 1), (1, 0)]
    assert local_peak_count(maps, 0.2).tolist() == [[2, 1], [1, 0]]


def test_integral_refinement_moves_to_the_centre_of_mass():
    maps = one_map({(5, 4): 1.0, (4, 4): 0.25, (6, 4): 0.75, (5, 3): 0.5, (5, 5): 0.5})
    points, _, _, _ = local_peaks(maps, 0.2, refinement="integral", patch=5)
    # x: (-0.25 + 0.75) / 3 = 1/6 to the right; y: symmetric.
    np.testing.assert_allclose(points.numpy(), [[5 + 1 / 6, 4.0]], atol=1e-6)
    global_points, _ = global_peaks(maps, 0.2, refinement="integral", patch=5)
    np.testing.assert_allclose(global_points[0, 0].numpy(), [5 + 1 / 6, 4.0], atol=1e-6)


def test_global_peaks_threshold_and_first_maximum():
    maps = torch.zeros(1, 2, 6, 6)
    maps[0, 0, 2, 3] = maps[0, 0, 4, 1] = 0.9  # two equal maxima: the first row / first column wins
    maps[0, 1, 1, 1] = 0.1
    points, values = global_peaks(maps, 0.2, refinement=None)
    assert points[0, 0].tolist() == [1.0, 2.0]  # x of the first column, y of the first row holding 0.9
    assert torch.isnan(points[0, 1]).all() and values[0, 1] == 0  # below the threshold


@pytest.mark.parametrize("center, size, origin", [
    ((10.0, 20.0), 5, (8, 18)),  # odd size: centred on the pixel
    ((10.3, 20.7), 5, (8, 18)),
    ((10.3, 20.7), 96, (-38, -27)),  # even size: shifted by the rounding of center + 0.5
    ((-0.4, 3.0), 4, (-2, 1)),
])
def test_window_origins_follow_sleap_nns_rule(center, size, origin):
    assert tuple(window_origins(torch.tensor([center]), size, size)[0].tolist()) == origin


def test_segment_scores_on_a_uniform_field():
    grouping = paf.PAFGrouping(edges=((0, 1),), n_nodes=2, pafs_stride=1, max_edge_length_ratio=0.25)
    pafs = torch.zeros(1, 2, 40, 40)
    pafs[0, 0] = 1.0  # the field points along +x everywhere
    src = torch.tensor([[5.0, 5.0], [5.0, 5.0], [5.0, 5.0], [0.0, 0.0]])
    dst = torch.tensor([[15.0, 5.0], [5.0, 15.0], [0.0, 5.0], [30.0, 30.0]])
    scores = paf.segment_scores(grouping, pafs, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                                src, dst)
    longest = 0.25 * 40  # max_edge_length_ratio x the PAFs' largest side x stride
    expected = [1.0, 0.0, -1.0, 1 / np.sqrt(2) + (longest / (30 * np.sqrt(2)) - 1)]
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-5)


def grouped(scores: dict, min_line_scores=0.25, min_instance_peaks=0, n_nodes=2, edges=((0, 1),)):
    """Group 2 peaks per node, (peak_src, peak_dst) -> score given per edge."""
    grouping = paf.PAFGrouping(edges=edges, n_nodes=n_nodes, pafs_stride=1, min_line_scores=min_line_scores,
                               min_instance_peaks=min_instance_peaks)
    channel = np.repeat(np.arange(n_nodes), 2)
    points = np.stack([np.arange(2 * n_nodes) * 10.0, np.arange(2 * n_nodes) * 1.0], 1).astype(np.float32)
    values = np.ones(2 * n_nodes, np.float32)
    found = paf.candidates(grouping, torch.zeros(2 * n_nodes, dtype=torch.long), torch.from_numpy(channel))
    table = {}
    for k, (s, d) in enumerate(edges):
        for (i, j), v in scores[k].items():
            table[(k, 2 * s + i, 2 * d + j)] = v
    line = np.array([table[(int(e), int(a), int(b))] for e, a, b in zip(found.edge, found.src, found.dst)],
                    np.float32)
    return paf.group(grouping, points, values, channel, found, line)


def test_grouping_matches_each_peak_once_by_score():
    instances, _, scores = grouped({0: {(0, 0): 0.9, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.8}})
    assert instances[:, :, 0].tolist() == [[0.0, 20.0], [10.0, 30.0]]  # A1-B1, A2-B2
    np.testing.assert_allclose(scores, [0.9, 0.8])
    # The Hungarian matching maximises the total: A1-B2 + A2-B1 = 1.5 beats A1-B1 + A2-B2 = 1.0.
    instances, _, _ = grouped({0: {(0, 0): 0.6, (0, 1): 0.7, (1, 0): 0.8, (1, 1): 0.4}})
    assert instances[:, :, 0].tolist() == [[0.0, 30.0], [10.0, 20.0]]


def test_grouping_drops_weak_lines_and_small_instances():
    instances, _, _ = grouped({0: {(0, 0): 0.9, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.8}}, min_line_scores=0.85)
    assert instances[:, :, 0].tolist() == [[0.0, 20.0]]
    instances, _, _ = grouped({0: {(0, 0): 0.9, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.8}}, min_instance_peaks=3)
    assert len(instances) == 0
    instances, _, _ = grouped({0: {(0, 0): 0.9, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.8}}, min_instance_peaks=1.0)
    assert len(instances) == 2  # a float is a fraction of the nodes: 1.0 x 2 nodes


def test_grouping_assembles_along_the_skeleton():
    # A chain 0 -> 1 -> 2; each pair of peaks links up strongly only with its own instance.
    strong = {(0, 0): 0.9, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.9}
    instances, point_scores, scores = grouped({0: strong, 1: strong}, n_nodes=3, edges=((0, 1), (1, 2)))
    assert instances[:, :, 0].tolist() == [[0.0, 20.0, 40.0], [10.0, 30.0, 50.0]]
    np.testing.assert_allclose(scores, [1.8, 1.8], atol=1e-6)
    assert not np.isnan(point_scores).any()


def test_class_maps_group_one_instance_per_class():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # peaks of node 0, 0, 1 in one frame
    points = torch.tensor([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]])
    instances, point_scores, class_scores = group_by_class(
        probs, points, torch.tensor([1.0, 0.5, 0.7]), torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1]),
        n_frames=1, n_nodes=2)
    assert instances[0, 0].tolist() == [[1.0, 1.0], [9.0, 9.0]]  # class 0: peak 0 and the node-1 peak
    assert instances[0, 1, 0].tolist() == [5.0, 5.0] and torch.isnan(instances[0, 1, 1]).all()
    np.testing.assert_allclose(class_scores[0, 0].numpy(), [0.9, 0.6], atol=1e-6)


def test_crops_share_out_the_classes():
    classes, probs = classify_crops(torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.1, 0.9]]))
    # Crops 1 and 2 take the classes (0.7 + 0.9 beats any pairing with crop 0); crop 0 gets none.
    assert classes.tolist() == [-1, 0, 1]
    np.testing.assert_allclose(probs[1:].numpy(), [0.7, 0.9], atol=1e-6)
    assert np.isnan(float(probs[0]))


@pytest.mark.parametrize("settings, frame, shape, scale", [
    ({}, (50, 70, 1), (1, 1, 50, 70), 1.0),
    ({"max_stride": 16}, (50, 70, 1), (1, 1, 64, 80), 1.0),
    ({"max_height": 100, "max_width": 100}, (50, 70, 1), (1, 1, 100, 100), 100 / 70),
    ({"scale": 0.5, "max_stride": 8}, (50, 70, 3), (1, 3, 32, 40), 1.0),
    ({"ensure_grayscale": True}, (50, 70, 3), (1, 1, 50, 70), 1.0),
    ({"ensure_rgb": True}, (50, 70, 1), (1, 3, 50, 70), 1.0),
])
def test_preprocessing_shapes(settings, frame, shape, scale):
    x, eff = Preprocessing(**settings)(as_frames(np.full((1, *frame), 200, np.uint8)))
    assert tuple(x.shape) == shape and eff == pytest.approx(scale)
    assert x.dtype == torch.float32 and float(x.max()) == pytest.approx(200 / 255, abs=0.01)


def test_size_matching_keeps_the_aspect_ratio_and_pads():
    frames = as_frames(np.full((1, 50, 100, 1), 255, np.uint8))
    sized, eff = Preprocessing(max_height=100, max_width=100).size_match(frames)
    assert eff == 1.0 * 100 / 100 and sized.shape[-2:] == (100, 100)
    assert sized[0, 0, :50].min() == 255 and sized[0, 0, 50:].max() == 0  # resized to 50x100, padded below
