"""Person-detection AP of an actor localiser on keyframes, as EVAD's official person meter scores it.

The official meter (PySlowFast's ``person_ap.py`` in EVAD) collects every proposal of the final box stage with
its person probability, drops keyframes without a ground-truth person, and scores the rest with the COCO
evaluator (pycocotools, maximum detections 1 / 10 / 100), logging AP (IoU 0.5:0.95), AP50 and AP75. Here the
same rows go through pycocotools' evaluator in float64, after they are gathered from every rank and each
keyframe the distributed sampler repeats is counted once (``FrameDetectionRows``).

Boxes are x1, y1, x2, y2 in any one scale for all frames (the tasks pass them normalised to [0, 1]): COCO's IoU
does not depend on it; only its small / medium / large split would, and it is not reported.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from lightning_modules.metrics.frame_ap import FrameDetectionRows, as_matrix


class PersonAP(FrameDetectionRows):
    """COCO AP of person boxes on keyframes (one class), exact under DDP padding.

    ``update(boxes, scores, gt_boxes, video_ids, times)`` takes one entry per keyframe: ``boxes[i]`` (N, 4) and
    ``scores[i]`` (N,) the localiser's proposals and person probabilities (all of them, before any threshold, as
    the official meter), ``gt_boxes[i]`` (M, 4) the annotated persons. ``compute()`` returns
    ``person_AP@0.5`` and ``person_AP@0.5:0.95`` (NaN without any ground-truth person).
    """

    def update(
        self,
        boxes: Sequence[Tensor],
        scores: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        video_ids: Tensor | Sequence[int],
        times: Tensor | Sequence[int],
    ) -> None:
        if not len(boxes) == len(scores) == len(gt_boxes):
            raise ValueError(
                f"one entry per keyframe: {len(boxes)} boxes, {len(scores)} scores, {len(gt_boxes)} gt"
            )
        entries = []
        for b, s, g in zip(boxes, scores, gt_boxes):
            det, truth = as_matrix(b, 4, "boxes"), as_matrix(g, 4, "gt_boxes")
            score = torch.as_tensor(s).detach().cpu().double().numpy().reshape(-1)
            if len(score) != len(det):
                raise ValueError(f"one score per box: {len(score)} scores for {len(det)} boxes")
            entries.append({
                "det_boxes": det, "det_scores": score, "det_labels": np.zeros(len(det), np.int64),
                "gt_boxes": truth, "gt_labels": np.zeros(len(truth), np.int64),
            })  # fmt: skip
        self._append(video_ids, times, entries)

    def compute(self) -> dict[str, Tensor]:
        _, det, gt = self._gathered()
        with_truth = np.unique(gt["frame"])
        if len(with_truth) == 0:
            nan = torch.tensor(float("nan"), device=self.device)
            return {"person_AP@0.5": nan, "person_AP@0.5:0.95": nan.clone()}
        # keyframes without a ground-truth person are left out, as the official meter
        d = np.isin(det["frame"], with_truth)
        ap, ap50 = coco_box_ap(
            det["frame"][d], det["det_boxes"][d], det["det_scores"][d], gt["frame"], gt["gt_boxes"]
        )
        return {
            "person_AP@0.5": torch.tensor(ap50, dtype=torch.float32, device=self.device),
            "person_AP@0.5:0.95": torch.tensor(ap, dtype=torch.float32, device=self.device),
        }


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def coco_box_ap(
    det_frame: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    gt_frame: np.ndarray,
    gt_boxes: np.ndarray,
) -> tuple[float, float]:
    """COCO box AP (IoU 0.5:0.95) and AP50 of one class, by pycocotools' evaluator (at most 100 detections per
    frame), from flat rows: frame index, x1, y1, x2, y2 boxes and detection scores (float64 throughout)."""
    if len(det_frame) == 0:
        return 0.0, 0.0  # persons and no detection
    frames = sorted(set(gt_frame.tolist()) | set(det_frame.tolist()))
    truth = COCO()
    gt_xywh = _xywh(gt_boxes)
    truth.dataset = {
        "images": [{"id": int(f)} for f in frames],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": int(f),
                "category_id": 1,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for i, (f, box) in enumerate(zip(gt_frame.tolist(), gt_xywh))
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        results = [
            {"image_id": int(f), "category_id": 1, "bbox": box, "score": float(score)}
            for f, box, score in zip(det_frame.tolist(), _xywh(det_boxes), det_scores.tolist())
        ]
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


__all__ = ["PersonAP", "coco_box_ap"]
