r"""Anchor-free detection: point assignment, loss, decoding and NMS (FCOS-style, simple).

The trade-off: FCOS's fixed assignment (Tian et al. 2019) with centre sampling instead of
YOLOv9's task-aligned assigner and distribution focal loss: fewer moving parts, a few points
of mAP less on real data.

Every feature-map cell at stride :math:`s` is a point :math:`p` at its centre. A point is a
positive of a ground-truth box when it lies inside the box, within ``radius * s`` of the box
centre (both axes), and :math:`\max(l, t, r, b)` (its distances to the box sides) falls in its
level's range ``(edges[i], edges[i+1]]``; a point claimed by several boxes takes the smallest.
A box no point claims gets the stride-8 point nearest its centre. The head predicts
:math:`\hat d = s\,\mathrm{softplus}(\cdot)` for the four distances and one logit per class.

.. math::
    L = \frac{1}{N_+}\Big(\sum_{p,c} \mathrm{FL}(\hat y_{pc}, y_{pc})
        + w_{box} \sum_{p \in +} (1 - \mathrm{GIoU}(\hat b_p, b_p))\Big)

with the sigmoid focal loss FL (:math:`\alpha = 0.25, \gamma = 2`). Predictions holding
twice the points are PGI's main and auxiliary outputs side by side (YOLOv9's ``DualDDetect``);
their losses weigh 1 and ``aux_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Classification bias so that every point starts at probability 0.01 (RetinaNet).
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)

Target = dict[str, Tensor]  # "boxes": (n, 4) x1 y1 x2 y2 in pixels; "labels": (n,) int64


def grid_points(image_size: int, strides: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Centres ``(P, 2)`` (x, y), strides ``(P,)`` and level indices ``(P,)`` of every point."""
    centres, point_strides, levels = [], [], []
    for level, s in enumerate(strides):
        side = image_size // s
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        centres.append(torch.stack((xs, ys), -1).reshape(-1, 2).float().add(0.5).mul(s))
        point_strides.append(torch.full((side * side,), float(s)))
        levels.append(torch.full((side * side,), level))
    return torch.cat(centres), torch.cat(point_strides), torch.cat(levels)


def decode(pred: Tensor, image_size: int, strides: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Boxes ``(N, P, 4)`` (x1 y1 x2 y2, pixels) and class logits ``(N, P, C)``."""
    centres, point_strides, _ = grid_points(image_size, strides)
    centres, point_strides = centres.to(pred), point_strides.to(pred)
    d = torch.nn.functional.softplus(pred[..., :4]) * point_strides[:, None]
    boxes = torch.cat((centres - d[..., :2], centres + d[..., 2:]), -1)
    return boxes, pred[..., 4:]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``(n, m)`` of boxes ``a (n, 4)`` and ``b (m, 4)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of matching rows of ``a`` and ``b`` (both ``(n, 4)``)."""
    wh_a, wh_b = (a[:, 2:] - a[:, :2]).clamp(min=0), (b[:, 2:] - b[:, :2]).clamp(min=0)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter.prod(-1)
    union = wh_a.prod(-1) + wh_b.prod(-1) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1)
    iou = inter / union.clamp(min=1e-9)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def assign(
    boxes: Tensor,
    centres: Tensor,
    point_strides: Tensor,
    levels: Tensor,
    edges: Sequence[float],
    radius: float,
) -> Tensor:
    """Index of the box each point detects, ``-1`` for background (see the module doc)."""
    n_points = len(centres)
    if len(boxes) == 0:
        return torch.full((n_points,), -1, dtype=torch.long)
    px, py = centres[:, 0:1], centres[:, 1:2]
    ltrb = torch.stack(
        (px - boxes[:, 0], py - boxes[:, 1], boxes[:, 2] - px, boxes[:, 3] - py), -1
    )  # (P, G, 4)
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    near = (centres[:, None] - box_centres[None]).abs() < radius * point_strides[:, None, None]
    reach = ltrb.amax(-1)
    lo = torch.tensor(edges, dtype=reach.dtype)[levels][:, None]
    hi = torch.tensor([*edges[1:], math.inf], dtype=reach.dtype)[levels][:, None]
    claimed = (ltrb.amin(-1) > 0) & near.all(-1) & (reach > lo) & (reach <= hi)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand_as(reach)
    cost = torch.where(claimed, area, torch.full_like(area, math.inf))
    best, match = cost.min(1)
    match[best.isinf()] = -1
    first = levels == 0
    for g in range(len(boxes)):
        if not (match == g).any():  # the stride-8 point nearest the box centre
            distance = (centres - box_centres[g]).square().sum(-1).masked_fill(~first, math.inf)
            match[distance.argmin()] = g
    return match


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """RetinaNet's focal loss, summed."""
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * ce).sum()


class DetectionLoss:
    """The loss of the module doc for images of side ``image_size``."""

    def __init__(
        self,
        image_size: int,
        strides: Sequence[int] = (8, 16, 32),
        edges: Sequence[float] | None = None,
        radius: float = 2.5,
        box_weight: float = 2.0,
        aux_weight: float = 0.25,
    ) -> None:
        self.image_size, self.strides = image_size, tuple(strides)
        # Level ranges scaled to small images: (0, s3], (s3, s4], (s4, inf) by default.
        self.edges = tuple(edges) if edges is not None else (0.0, *map(float, strides[:-1]))
        self.radius, self.box_weight, self.aux_weight = radius, box_weight, aux_weight
        self.points = grid_points(image_size, strides)

    def __call__(self, pred: Tensor, targets: Sequence[Target]) -> Tensor:
        n_points = len(self.points[0])
        if pred.shape[1] == 2 * n_points:  # PGI: main and auxiliary predictions
            main, aux = pred.split(n_points, 1)
            return self.single(main, targets) + self.aux_weight * self.single(aux, targets)
        if pred.shape[1] != n_points:
            raise ValueError(
                f"predictions hold {pred.shape[1]} points; images of side {self.image_size} "
                f"at strides {self.strides} give {n_points} (or twice that with PGI)."
            )
        return self.single(pred, targets)

    def single(self, pred: Tensor, targets: Sequence[Target]) -> Tensor:
        centres, point_strides, levels = self.points
        boxes, logits = decode(pred, self.image_size, self.strides)
        cls_target = torch.zeros_like(logits)
        pred_boxes, true_boxes = [], []
        for i, target in enumerate(targets):
            match = assign(target["boxes"].cpu().float(), centres, point_strides, levels,
                           self.edges, self.radius).to(pred.device)  # fmt: skip
            positive = match >= 0
            cls_target[i, positive, target["labels"].to(pred.device)[match[positive]]] = 1.0
            pred_boxes.append(boxes[i, positive])
            true_boxes.append(target["boxes"].to(pred)[match[positive]])
        n_pos = max(sum(len(b) for b in pred_boxes), 1)
        box_loss = (1 - giou(torch.cat(pred_boxes), torch.cat(true_boxes))).sum()
        return (sigmoid_focal_loss(logits, cls_target) + self.box_weight * box_loss) / n_pos


def nms(boxes: Tensor, scores: Tensor, iou: float, limit: int | None = None) -> Tensor:
    """Indices of the boxes greedy non-maximum suppression keeps, best first (at most
    ``limit``): one pass per kept box."""
    order = scores.argsort(descending=True)
    overlap = box_iou(boxes[order], boxes[order])
    alive = torch.ones(len(order), dtype=torch.bool)
    keep: list[int] = []
    while alive.any() and (limit is None or len(keep) < limit):
        k = int(alive.to(torch.uint8).argmax())  # the best box still alive
        keep.append(k)
        alive &= overlap[k] <= iou
        alive[k] = False
    return order[keep]


def postprocess(
    pred: Tensor,
    image_size: int,
    strides: Sequence[int] = (8, 16, 32),
    score_threshold: float = 0.05,
    iou: float = 0.6,
    max_detections: int = 100,
) -> list[Target]:
    """Per image: boxes, scores and labels after thresholding and per-class NMS."""
    boxes, logits = decode(pred, image_size, strides)
    scores = logits.sigmoid()
    out = []
    for b, s in zip(boxes, scores):
        point, label = (s > score_threshold).nonzero(as_tuple=True)
        score = s[point, label]
        top = score.topk(min(len(score), 10 * max_detections)).indices
        point, label, score = point[top], label[top], score[top]
        box = b[point].clamp(0, image_size)
        # per-class NMS in one pass: offset each class's boxes apart
        keep = nms(box + label[:, None].to(box) * 2 * image_size, score, iou, max_detections)
        out.append({"boxes": box[keep], "scores": score[keep], "labels": label[keep]})
    return out
