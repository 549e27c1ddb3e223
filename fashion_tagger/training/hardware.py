"""Where and how a run trains: Lightning's accelerator, devices, nodes, strategy and precision from `train.*`
(devices through `core.parallel.parse_devices`, the one parser) and, under torchrun, from its environment.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy

from fashion_tagger.core.config import Config
from fashion_tagger.core.parallel import AUTO, parse_devices


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """auto: bf16 mixed precision on GPUs that have it (fp16 mixed on older ones), fp32 on CPU."""
    if precision != "auto":
        return precision
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_hardware(config: Config) -> dict[str, Any]:
    """Trainer accelerator/devices/num_nodes/strategy/precision from the config and torchrun's environment."""
    train = config.train
    accelerator = train.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    devices: int | str | list[int] = parse_devices(train.devices)
    num_nodes = train.num_nodes
    # Under torchrun every process already exists: the world shape comes from its environment.
    if "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, int(os.environ.get("WORLD_SIZE", devices)) // devices)
    if devices in (AUTO, -1):  # -1 is Lightning's "all GPUs"
        n_devices = torch.cuda.device_count() if on_gpu else 1
    else:
        n_devices = len(devices) if isinstance(devices, list) else int(devices)
    strategy: Any = "auto"
    if n_devices * num_nodes > 1:
        # Parameters frozen for some epochs get no gradient then; DDP must be told to expect that.
        strategy = DDPStrategy(find_unused_parameters=train.freeze_backbone_epochs > 0, gradient_as_bucket_view=True)
    return {
        "accelerator": "gpu" if on_gpu else ("cpu" if accelerator == "auto" else accelerator),
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
        "precision": resolve_precision(train.precision, on_gpu),
    }
