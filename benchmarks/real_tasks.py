"""Task agreement of a converted real model with its original, computed with each package's own post-processing.

Each function is a normswap task metric: ``metric(reference_outputs, candidate_outputs) -> 0..1``, one array
per model output, every sample along axis 0. They mirror rapidocr-onnxruntime 1.4.4's post-processing:

- text-direction classifier (``TextClassifier``): the line is rotated when the argmax is label '180' with score
  above ``cls_thresh`` 0.9 -- agreement is the share of lines with the same decision;
- recognizer (``CTCLabelDecode``): greedy CTC decoding, the argmax per step with repeats merged and the blank
  (index 0) dropped -- agreement is the share of identical decoded strings;
- DB detector (``DBPostProcess``): the probability map thresholded at ``thresh`` 0.3, each connected region a
  box kept when its mean probability is at least ``box_thresh`` 0.5 and its sides at least 3 pixels (the axis-
  aligned bounding box stands for rapidocr's minimum-area rectangle) -- agreement is min(box F1 at IoU 0.5, IoU of
  the thresholded masks).
"""
from __future__ import annotations

import numpy as np

CLS_THRESH = 0.9
DB_THRESH, DB_BOX_THRESH, DB_MIN_SIZE = 0.3, 0.5, 3


def rotation_decisions(probs: np.ndarray) -> np.ndarray:
    return (probs.argmax(1) == 1) & (probs.max(1) > CLS_THRESH)


def classifier_agreement(reference, candidate) -> float:
    return float(np.mean(rotation_decisions(reference[0]) == rotation_decisions(candidate[0])))


def ctc_strings(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of (N, T, K) scores: one index sequence per sample."""
    out = []
    for path in probs.argmax(2):
        merged = [int(k) for j, k in enumerate(path) if k != 0 and (j == 0 or k != path[j - 1])]
        out.append(tuple(merged))
    return out


def recognizer_agreement(reference, candidate) -> float:
    a, b = ctc_strings(reference[0]), ctc_strings(candidate[0])
    return float(np.mean([x == y for x, y in zip(a, b)]))


def db_boxes(prob: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (y0, x0, y1, x1) of one (H, W) DB probability map."""
    from scipy import ndimage
    labels, count = ndimage.label(prob > DB_THRESH)
    boxes = []
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        ys, xs = region
        if ys.stop - ys.start < DB_MIN_SIZE or xs.stop - xs.start < DB_MIN_SIZE:
            continue
        if float(prob[region][labels[region] == k].mean()) < DB_BOX_THRESH:
            continue
        boxes.append((ys.start, xs.start, ys.stop, xs.stop))
    return boxes


def _iou(a, b) -> float:
    h = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def box_f1(reference: np.ndarray, candidate: np.ndarray) -> float:
    """F1 of the candidate's boxes against the reference's (greedy one-to-one matching at IoU >= 0.5), pooled."""
    hits = ref_total = cand_total = 0
    for r, c in zip(reference, candidate):
        rb, cb = db_boxes(r[0]), db_boxes(c[0])
        ref_total += len(rb)
        cand_total += len(cb)
        used: set[int] = set()
        for box in rb:
            best = max(((_iou(box, other), j) for j, other in enumerate(cb) if j not in used), default=(0.0, -1))
            if best[0] >= 0.5:
                used.add(best[1])
                hits += 1
    if ref_total + cand_total == 0:
        return 1.0
    return 2 * hits / (ref_total + cand_total)


def detector_agreement(reference, candidate) -> float:
    r, c = reference[0] > DB_THRESH, candidate[0] > DB_THRESH
    union = np.sum(r | c)
    mask_iou = float(np.sum(r & c) / union) if union else 1.0
    return min(box_f1(reference[0], candidate[0]), mask_iou)


METRICS = {"classifier": classifier_agreement, "recognizer": recognizer_agreement, "detector": detector_agreement}
MEASURES = {"classifier": "same rotation decision (argmax '180' above 0.9)",
            "recognizer": "identical CTC-decoded strings",
            "detector": "min(DB box F1 at IoU 0.5, mask IoU)"}
