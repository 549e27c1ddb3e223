"""Losses over the per-attribute logits where a 'None' label (IGNORE_INDEX) never counts.

`MaskedMultiHeadLoss` is the default: softmax cross-entropy per attribute, since each attribute has exactly
one value. `ReferenceBCELoss` reproduces the reference notebook (one-hot over all classes, BCE times the
None mask) so both can be compared on the same data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fashion_tagger.core.schema import IGNORE_INDEX

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]  # total, per-attribute (detached for logging)


class MaskedMultiHeadLoss(nn.Module):
    """Sum over attributes of weight x mean cross-entropy over that attribute's non-None rows.

    An attribute with no labelled row in the batch contributes exactly 0 (not NaN), so a batch whose
    labels are all 'None' gives loss 0 and zero gradients.
    """

    def __init__(
        self,
        attributes: Sequence[str],
        *,
        label_smoothing: float = 0.0,
        attribute_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(attribute_weights or {}) - set(attributes))
        if unknown:
            raise ValueError(f"train.attribute_weights names unknown attributes: {', '.join(unknown)}")
        self.attributes = list(attributes)
        self.label_smoothing = label_smoothing
        self.weights = {a: float((attribute_weights or {}).get(a, 1.0)) for a in self.attributes}

    def forward(self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> LossOutput:
        total = next(iter(logits.values())).new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for attribute in self.attributes:
            target = targets[attribute]
            labelled = (target != IGNORE_INDEX).sum()
            # reduction="mean" divides by zero when every row is ignored; sum / max(n, 1) is 0 instead.
            summed = F.cross_entropy(
                logits[attribute].float(),
                target,
                ignore_index=IGNORE_INDEX,
                label_smoothing=self.label_smoothing,
                reduction="sum",
            )
            loss = summed / labelled.clamp(min=1)
            parts[attribute] = loss.detach()
            total = total + self.weights[attribute] * loss
        return total, parts


class ReferenceBCELoss(nn.Module):
    """The reference recipe: sigmoid outputs over all classes concatenated, one-hot targets, BCE x mask.

    The mask zeroes every class of an attribute whose label is 'None'; the mean runs over all entries
    (masked ones included), as `mean(bce * mask)` does in the notebook.
    """

    def __init__(self, attributes: Sequence[str]) -> None:
        super().__init__()
        self.attributes = list(attributes)

    def forward(self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> LossOutput:
        masked_bce = []
        parts: dict[str, torch.Tensor] = {}
        for attribute in self.attributes:
            out = logits[attribute].float()
            labelled = (targets[attribute] != IGNORE_INDEX)[:, None].float()
            onehot = F.one_hot(targets[attribute].clamp(min=0), out.shape[1]).float() * labelled
            bce = F.binary_cross_entropy_with_logits(out, onehot, reduction="none") * labelled
            parts[attribute] = bce.mean().detach()
            masked_bce.append(bce)
        return torch.cat(masked_bce, dim=1).mean(), parts


def build_loss(
    kind: str,
    attributes: Sequence[str],
    *,
    label_smoothing: float = 0.0,
    attribute_weights: Mapping[str, float] | None = None,
) -> nn.Module:
    if kind == "ce":
        return MaskedMultiHeadLoss(attributes, label_smoothing=label_smoothing, attribute_weights=attribute_weights)
    if kind == "bce":
        return ReferenceBCELoss(attributes)
    raise ValueError(f"train.loss must be 'ce' or 'bce', not {kind!r}")
