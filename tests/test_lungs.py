"""Tests of the automatic CT lung mask (synthetic phantoms, real COVID-CT slices when present), the
share of a map inside it, and cam_in_lungs in explanations."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from synthetic import encode, gradient_image, tiny_bundle

from covidscan.lungs import (
    draw_outline,
    lung_mask,
    outside_lungs_warning,
    region_count,
    share_inside,
)
from covidscan.predictor import Predictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def phantom(size: int = 320, seed: int = 0, paper_figure: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A lung-window axial slice: dark air, a bright body, two dark lungs with bright vessels.

    Returns:
        The RGB slice and the true lung mask.
    """
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 10, np.uint8)
    c = size // 2
    cv2.ellipse(image, (c, c), (int(size * 0.45), int(size * 0.33)), 0, 0, 360, 200, -1)  # body
    truth = np.zeros((size, size), np.uint8)
    for side in (-1, 1):
        cv2.ellipse(truth, (c + side * int(size * 0.2), c), (int(size * 0.15), int(size * 0.24)), 0, 0, 360, 1, -1)
    image[truth > 0] = 40
    # Vessels and a small opacity inside the lungs (brighter than lung, part of it).
    ys, xs = np.nonzero(truth)
    for index in rng.choice(len(ys), 40, replace=False):
        cv2.circle(image, (int(xs[index]), int(ys[index])), int(rng.integers(1, 3)), 190, -1)
    cv2.circle(image, (c - int(size * 0.2), c + int(size * 0.05)), size // 30, 150, -1)
    cv2.circle(image, (c, c - int(size * 0.22)), size // 40, 15, -1)  # the trachea: dark, small, not lung
    image = np.clip(image.astype(np.int16) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    if paper_figure:  # a white page margin around the slice, with a caption letter and an arrow
        page = np.full((size + 80, size + 80), 255, np.uint8)
        page[40:40 + size, 40:40 + size] = image
        cv2.putText(page, "A", (size + 10, size + 70), cv2.FONT_HERSHEY_SIMPLEX, 1.5, 0, 3)
        cv2.arrowedLine(page, (size + 60, 60), (size - 20, 120), 255, 4)
        big = np.zeros_like(page)
        big[40:40 + size, 40:40 + size] = truth
        image, truth = page, big
    return np.repeat(image[..., None], 3, axis=2), truth.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_lungs_are_found(seed):
    pixels, truth = phantom(seed=seed)
    mask = lung_mask(pixels)
    assert mask.shape == truth.shape and mask.dtype == bool
    assert iou(mask, truth) > 0.85
    assert region_count(mask) == 2  # two lungs; the trachea is left out


def test_phantom_in_a_paper_figure_and_a_large_slice():
    pixels, truth = phantom(paper_figure=True)
    assert iou(lung_mask(pixels), truth) > 0.85
    big, big_truth = phantom(size=900, seed=4)  # segmented at a working size, mask at full size
    mask = lung_mask(big)
    assert mask.shape == (900, 900) and iou(mask, big_truth) > 0.85


def test_blank_and_uniform_images_have_no_lungs():
    assert not lung_mask(np.zeros((64, 64, 3), np.uint8)).any()
    assert not lung_mask(np.full((64, 64), 128, np.uint8)).any()


def test_share_inside_maths():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    uniform = np.ones((10, 10), np.float32)
    assert share_inside(uniform, mask) == pytest.approx(0.5)
    left = np.zeros((10, 10), np.float32)
    left[:, :5] = 1.0
    assert share_inside(left, mask) == pytest.approx(1.0)
    assert share_inside(1.0 - left, mask) == pytest.approx(0.0)
    weighted = left * 3 + (1 - left) * 1  # three times as hot inside
    assert share_inside(weighted, mask) == pytest.approx(0.75)
    assert share_inside(np.ones((20, 20), np.float32), mask) == pytest.approx(0.5)  # resized to the mask
    assert share_inside(uniform, np.zeros((10, 10), bool)) is None
    assert share_inside(np.zeros((10, 10), np.float32), mask) is None
    assert outside_lungs_warning(0.3) == ("The model looked mostly outside the lungs: the heatmap's mass "
                                          "is 30% inside them.")
    assert outside_lungs_warning(0.5) is None and outside_lungs_warning(None) is None


def test_outline_is_drawn_on_the_boundary_only():
    pixels, truth = phantom(size=200)
    drawn = draw_outline(np.zeros_like(pixels), truth, (255, 0, 0))
    red = drawn[..., 0] > 0
    assert red.any() and not drawn[..., 1].any()
    eroded = cv2.erode(truth.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert not (red & eroded).any()  # nothing drawn deep inside a lung


def test_explanations_report_the_share_in_the_lungs_for_ct_and_none_for_xray(tmp_path):
    pixels, truth = phantom(size=160)
    ct = Predictor(tiny_bundle(tmp_path / "ct"))
    _, explanation = ct.explain(encode(pixels), method="gradcam", lung_outline=True)
    assert explanation.lung_mask is not None and iou(explanation.lung_mask, truth) > 0.85
    assert explanation.in_lungs == pytest.approx(share_inside(explanation.heatmap, explanation.lung_mask))
    assert 0.0 <= explanation.in_lungs <= 1.0
    assert bool(explanation.warnings) == (explanation.in_lungs < 0.5)
    plain = ct.explain(encode(pixels), method="gradcam")[1].overlay
    assert not np.array_equal(plain, explanation.overlay)  # the outline is drawn on request only
    xray = Predictor(tiny_bundle(tmp_path / "xray", modality="X-ray"))
    _, explanation = xray.explain(encode(gradient_image(96, 96)), method="gradcam", lung_outline=True)
    assert explanation.in_lungs is None and explanation.lung_mask is None and explanation.warnings == []


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "covid-ct").is_dir(), reason="../shared/data/covid-ct is not present")
def test_real_covid_ct_slices_get_plausible_masks():
    from covidscan.datasets import open_dataset
    from covidscan.images import read_image

    data = open_dataset("covid-ct", SHARED / "covid-ct", split="val")
    fractions, two_lungs = [], 0
    for item in data.items[:30]:
        mask = lung_mask(read_image(str(item.path), window="lung").pixels)
        fractions.append(mask.mean())
        two_lungs += region_count(mask) == 2
    fractions = np.array(fractions)
    assert (fractions > 0).mean() >= 0.9  # a mask for nearly every slice
    assert 0.08 <= np.median(fractions) <= 0.5  # lungs fill a plausible part of the picture
    assert fractions.max() < 0.7
    assert two_lungs >= 0.5 * len(fractions)
