"""An automatic lung-field mask for axial chest CT slices, and the share of a CAM inside it.

Classical segmentation (OpenCV + SciPy, no trained model): on a lung-window slice, lungs are the
large dark regions enclosed by the bright body. So: Otsu threshold (dark = air), drop the dark
regions connected to the image border (the air around the patient, black figure margins), clean
up with morphology, fill holes (vessels, consolidations enclosed by lung), and keep the one or two
largest regions.

X-rays get no mask (:func:`cam_in_lungs` returns None): a projection overlays the lungs with the
heart, ribs and diaphragm, and no classical threshold separates them soundly; a trained lung
segmenter would have to be shipped and validated first, and there is none offline here.
"""
from __future__ import annotations

import numpy as np

# Below this share of its heatmap's mass inside the lungs, a map is flagged.
OUTSIDE_LUNGS_THRESHOLD = 0.5
OUTSIDE_LUNGS_WARNING = "The model looked mostly outside the lungs: the heatmap's mass is {share:.0%} inside them."
# Segmentation runs at this longer side at most (speed, and morphology sizes that mean the same).
_WORK_SIDE = 384
# A lung region is at least this share of the image, and the second lung at least this share of
# the first (smaller dark pockets are the trachea, bowel gas, text in a figure).
_MIN_REGION_FRACTION = 0.004
_MIN_SECOND_LUNG_RATIO = 0.08


def lung_mask(pixels: np.ndarray) -> np.ndarray:
    """The lung fields of an axial CT slice shown in a lung window.

    Args:
        pixels: the slice as displayed, H x W (grayscale) or H x W x 3 (RGB) uint8.

    Returns:
        A boolean H x W mask; all False when no lung-like region is found.
    """
    import cv2
    from scipy import ndimage

    gray = pixels if pixels.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_RGB2GRAY)
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    height, width = gray.shape
    scale = min(1.0, _WORK_SIDE / max(height, width))
    small = gray if scale == 1.0 else cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))),
                                                 interpolation=cv2.INTER_AREA)
    small = cv2.medianBlur(small, 5)
    threshold, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = small <= threshold
    side = max(small.shape)
    # Cut thin dark bridges (a lung touching the air outside through a gap in the skin line).
    dark = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, _disk(max(1, side // 128))).astype(bool)
    labels, count = ndimage.label(dark)
    if count == 0:
        return np.zeros((height, width), dtype=bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = dark & ~np.isin(labels, border[border > 0])
    inside = ndimage.binary_fill_holes(inside & ~_enclosing_regions(inside, labels, max(1, side // 48)))
    # Pick the lungs before closing, so the trachea and small pockets are not merged into them;
    # then close over the vessels and opacities at the lung edge and fill what the lungs enclose.
    kept = _largest_regions(inside, small.size)
    kept = cv2.morphologyEx(kept.astype(np.uint8), cv2.MORPH_CLOSE, _disk(max(1, side // 48))).astype(bool)
    kept = ndimage.binary_fill_holes(kept)
    if scale != 1.0:
        kept = cv2.resize(kept.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return kept


def _enclosing_regions(inside: np.ndarray, labels: np.ndarray, bridge: int, candidates: int = 6) -> np.ndarray:
    """Dark regions that enclose other dark regions: the air around the patient in a figure with a
    white page margin (it does not touch the image border, but the lungs lie inside it). Gaps up to
    ``bridge`` pixels (an arrow or a caption drawn across the air) are closed first."""
    import cv2
    from scipy import ndimage

    present = np.unique(labels[inside])
    if present.size < 2:
        return np.zeros_like(inside)
    areas = ndimage.sum(inside, labels, index=present)
    enclosing = np.zeros_like(inside)
    for label in present[np.argsort(areas)[::-1][:candidates]]:
        region = labels == label
        closed = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_CLOSE, _disk(bridge)).astype(bool)
        enclosed = ndimage.binary_fill_holes(closed) & ~closed & inside
        if enclosed.sum() >= _MIN_REGION_FRACTION * inside.size:
            enclosing |= region
    return enclosing


def _largest_regions(mask: np.ndarray, image_area: int) -> np.ndarray:
    """The one or two largest regions of ``mask`` that are big enough to be a lung."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    areas = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    order = np.argsort(areas)[::-1]
    keep = [order[0]] if areas[order[0]] >= _MIN_REGION_FRACTION * image_area else []
    if keep and count > 1 and areas[order[1]] >= max(_MIN_SECOND_LUNG_RATIO * areas[order[0]],
                                                        _MIN_REGION_FRACTION * image_area):
        keep.append(order[1])
    return np.isin(labels, [index + 1 for index in keep])


def _disk(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def region_count(mask: np.ndarray) -> int:
    """How many separate regions (e.g. lungs) a mask has."""
    from scipy import ndimage

    return int(ndimage.label(mask)[1])


def share_inside(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """The share (0..1) of a heatmap's mass inside a mask: sum(heatmap * mask) / sum(heatmap).

    Args:
        heatmap: non-negative map, H x W (resized to the mask when the sizes differ).
        mask: boolean H x W.

    Returns:
        The share, or None when the mask is empty or the map has no mass.
    """
    import cv2

    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    if heat.shape != mask.shape:
        heat = cv2.resize(heat, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
    total = float(heat.sum())
    if not mask.any() or total <= 0.0:
        return None
    return float(heat[mask].sum() / total)


def outside_lungs_warning(share: float | None) -> str | None:
    """The warning for a map mostly outside the lungs (share under 0.5), else None."""
    if share is None or share >= OUTSIDE_LUNGS_THRESHOLD:
        return None
    return OUTSIDE_LUNGS_WARNING.format(share=share)


def draw_outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A copy of an RGB uint8 image with the mask's outline drawn on it (resized to the image)."""
    import cv2

    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(rgb.copy())
    thickness = max(1, round(max(rgb.shape[:2]) / 256))
    cv2.drawContours(out, contours, -1, color, thickness, lineType=cv2.LINE_AA)
    return out
