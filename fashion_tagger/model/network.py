"""The tagger network: a timm backbone without classifier plus one small head per attribute.

`forward_features` gives the pooled image embedding, `forward_head` turns it into one logit vector per
attribute, so training, export and serving all share the same two halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from fashion_tagger.core.errors import ModelError, ModelUnavailableError

__all__ = ["NETWORK_FIELDS", "FashionTagger", "ModelError", "build_network", "create_backbone"]

# The model settings that rebuild the network (an export and a checkpoint keep them); the rest of `model.` is
# about weights (pretrained, pretrained_path), which a rebuild never downloads.
NETWORK_FIELDS = ("backbone", "hidden_dim", "dropout", "drop_path_rate")


class AttributeHead(nn.Sequential):
    """Dropout + linear, or dropout + hidden layer + GELU + dropout + linear when hidden_dim > 0."""

    def __init__(self, in_features: int, num_classes: int, *, hidden_dim: int = 0, dropout: float = 0.0) -> None:
        if hidden_dim > 0:
            layers = [
                nn.Dropout(dropout),
                nn.Linear(in_features, hidden_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, num_classes),
            ]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(in_features, num_classes)]
        super().__init__(*layers)


class FashionTagger(nn.Module):
    """`timm.create_model(backbone, num_classes=0)` and a head per attribute, sized from the label space."""

    def __init__(
        self,
        backbone: str,
        num_classes: Mapping[str, int],
        *,
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, pretrained_path=pretrained_path, drop_path_rate=drop_path_rate
        )
        # Models with a pre-logits stage (MobileNetV3's conv_head, ViT's pre-logits) emit head_hidden_size.
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        in_features = int(features)  # type: ignore[arg-type]  # nn.Module's __getattr__ hides timm's int
        self.heads = nn.ModuleDict(
            {
                attribute: AttributeHead(in_features, n, hidden_dim=hidden_dim, dropout=dropout)
                for attribute, n in num_classes.items()
            }
        )

    @property
    def attributes(self) -> list[str]:
        return list(self.heads)

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's pretrained preprocessing (mean, std, interpolation), as timm resolves it."""
        return resolve_data_config({}, model=self.backbone)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (batch x in_features of the heads)."""
        return self.backbone(images)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {attribute: head(features) for attribute, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(images))


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm model without classifier; weights from `pretrained_path`, else the timm hub when `pretrained`."""
    if not timm.is_model(name.partition(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ModelError(f"unknown timm backbone {name!r}; similar names: {', '.join(close) or 'none'}")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_path:
        path = Path(pretrained_path).expanduser()
        if not path.is_file():
            raise ModelError(
                f"model.pretrained_path {path} does not exist: point it at a .safetensors/.pth state dict of {name} "
                "(`fashion-tagger weights` writes one), or use imagenet-lite0 with tf_efficientnet_lite0"
            )
        # timm filters the ImageNet classifier out of the file because num_classes differs.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        # Hub failures (connection, HTTP, offline cache miss) are all OSError subclasses; a bad local file
        # surfaces as RuntimeError (shape mismatch) or ValueError (unknown format).
        if not pretrained:
            raise
        if pretrained_path:
            raise ModelError(f"cannot load {name} weights from {pretrained_path}: {exc}") from exc
        # The hub raises a zoo of connection/HTTP/offline errors; all mean the same thing to the user.
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or f"timm/{name}"
        reason = (str(exc).splitlines() or [""])[0].rstrip(".")
        raise ModelUnavailableError(
            f"cannot download pretrained weights for {name!r} from the timm hub (hf.co/{hub_id}): "
            f"{type(exc).__name__}: {reason}. Without network access either set model.pretrained_path to a "
            f"local weights file (model.safetensors of hf.co/{hub_id}, or torch.save(model.state_dict()) of "
            f"`timm.create_model('{name}', pretrained=True)` on a connected machine), copy a filled Hugging Face "
            "cache into $HF_HOME, or train from scratch with model.pretrained=false. "
            "HF_HUB_OFFLINE=1 makes this check fail at once instead of after retries"
        ) from exc


def build_network(
    fields: Mapping[str, Any],
    num_classes: Mapping[str, int],
    *,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
) -> FashionTagger:
    """The one way the tagger network is built: from its NETWORK_FIELDS (a `model.` config section, a checkpoint's
    hyperparameters or an export's tagger.json) and the head sizes. Training asks for pretrained weights on a
    fresh run; a rebuild (checkpoint, export, serving) never does and loads its state dict instead."""
    return FashionTagger(
        str(fields["backbone"]),
        num_classes,
        pretrained=pretrained,
        pretrained_path=pretrained_path,
        hidden_dim=int(fields.get("hidden_dim") or 0),
        dropout=float(fields.get("dropout") or 0.0),
        drop_path_rate=float(fields.get("drop_path_rate") or 0.0),
    )
