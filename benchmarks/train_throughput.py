"""Training images/s of the reference recipe against ours, same backbone, heads and batch, measured in one run.

reference: fp32, NCHW, one-hot BCE over all classes (the notebook's loss).
ours:      masked softmax CE, channels_last; on GPU bf16 autocast, with and without torch.compile.
Each step is forward + backward + gradient clipping + AdamW on one batch held on the device, so the
numbers are the network's cost alone (benchmarks/loader.py measures feeding it). Settings are run in
interleaved rounds and the median is reported, which keeps a busy machine from favouring one of them.

    python benchmarks/train_throughput.py                                   # CPU: small backbone and size
    python benchmarks/train_throughput.py --device cuda --backbone efficientnet_b3 --width 240 --height 320 \
        --batch-size 128                                                   # GPU (benchmarks/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_tagger.core.schema import IGNORE_INDEX  # noqa: E402
from fashion_tagger.model.network import FashionTagger  # noqa: E402
from fashion_tagger.training.losses import MaskedMultiHeadLoss, ReferenceBCELoss  # noqa: E402

# Trainable classes per attribute on the real dataset with min_class_count=500 (71 in all).
NUM_CLASSES = {
    "gender": 5,
    "masterCategory": 4,
    "subCategory": 15,
    "articleType": 23,
    "baseColour": 16,
    "season": 4,
    "usage": 4,
}
NONE_SHARE = 0.1  # share of masked ('None') labels in the generated targets


@dataclass(frozen=True)
class Setting:
    name: str
    loss: str  # "bce" (reference) or "ce"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


SETTINGS = {
    s.name: s
    for s in (
        Setting("reference", "bce"),
        Setting("ours-fp32", "ce", channels_last=True),
        Setting("bf16", "ce", bf16=True),
        Setting("bf16+cl", "ce", bf16=True, channels_last=True),
        Setting("bf16+cl+compile", "ce", bf16=True, channels_last=True, compile=True),
    )
}
DEFAULT_SETTINGS = {"cpu": ["reference", "ours-fp32"], "cuda": list(SETTINGS)}


class Runner:
    """One model + optimiser per setting, built once; `run(steps)` times that many training steps."""

    def __init__(self, setting: Setting, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        self.setting, self.device = setting, device
        self.model = FashionTagger(args.backbone, NUM_CLASSES, pretrained=False, hidden_dim=args.hidden_dim).to(device)
        memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model.to(memory_format=memory_format)
        self.images = torch.randn(args.batch_size, 3, args.height, args.width, device=device).contiguous(
            memory_format=memory_format
        )
        generator = torch.Generator().manual_seed(1)
        self.targets = {}
        for attribute, n in NUM_CLASSES.items():
            target = torch.randint(0, n, (args.batch_size,), generator=generator)
            target[torch.rand(args.batch_size, generator=generator) < NONE_SHARE] = IGNORE_INDEX
            self.targets[attribute] = target.to(device)
        attributes = list(NUM_CLASSES)
        self.loss = ReferenceBCELoss(attributes) if setting.loss == "bce" else MaskedMultiHeadLoss(attributes)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        if setting.compile:
            self.model.compile()
        self.batch_size = args.batch_size

    def _step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.setting.bf16):
            loss, _ = self.loss(self.model(self.images), self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        """Images per second over `steps` steps."""
        self._sync()
        started = time.perf_counter()
        for _ in range(steps):
            self._step()
        self._sync()
        return steps * self.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--backbone", default=None, help="default: efficientnet_b3 on GPU, efficientnet_b0 on CPU")
    parser.add_argument("--width", type=int, default=None, help="default: 240 on GPU, 48 on CPU")
    parser.add_argument("--height", type=int, default=None, help="default: 320 on GPU, 64 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on GPU, 32 on CPU")
    parser.add_argument("--hidden-dim", type=int, default=0, help="hidden layer per head (the reference used 1024)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 2 CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--settings", default=None, help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    args.backbone = args.backbone or ("efficientnet_b3" if gpu else "efficientnet_b0")
    args.width = args.width or (240 if gpu else 48)
    args.height = args.height or (320 if gpu else 64)
    args.batch_size = args.batch_size or (128 if gpu else 32)
    args.steps = args.steps or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.settings.split(",") if args.settings else DEFAULT_SETTINGS[device.type]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if gpu:
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backbone} {args.width}x{args.height}, batch {args.batch_size}, {where}, torch {torch.__version__}")

    # Compiled settings go in a second phase: their compilation takes minutes, and the eager figures should
    # be on screen before that starts (gpu.sh runs this under a deadline).
    eager = [n for n in names if not SETTINGS[n].compile]
    compiled = [n for n in names if SETTINGS[n].compile]
    rates: dict[str, list[float]] = {}
    header_printed = False
    for phase in (eager, compiled):
        if not phase:
            continue
        runners = build_runners(phase, args, device)
        if "reference" not in phase and "reference" in rates:
            runners = {"reference": build_runners(["reference"], args, device)["reference"], **runners}
        for name in runners:
            rates.setdefault(name, [])
        for _ in range(args.rounds):  # interleaved, so a busy machine slows every setting alike
            for name, runner in runners.items():
                rates[name].append(runner.run(args.steps))
        if not header_printed:
            print(f"\n{'setting':18s} {'images/s':>10s} {'x reference':>12s}   rounds")
            header_printed = True
        base = statistics.median(rates["reference"]) if "reference" in rates else None
        for name in runners:
            if name == "reference" and phase is compiled:
                continue
            median = statistics.median(rates[name])
            ratio = f"{median / base:12.2f}" if base else f"{'-':>12s}"
            print(f"{name:18s} {median:10.1f} {ratio}   {', '.join(f'{v:.1f}' for v in rates[name])}", flush=True)
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not rates:
        sys.exit("every setting failed")
    if args.json:
        medians = {name: statistics.median(values) for name, values in rates.items()}
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": where,
                                         "images_per_s": medians, "rounds": rates}, indent=2))


def build_runners(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Runner]:
    """Build and warm up each setting; one that fails (say, no compiler for torch.compile) is reported and skipped."""
    runners = {}
    for name in names:
        started = time.perf_counter()
        try:
            runner = Runner(SETTINGS[name], args, device)
            runner.run(args.warmup)  # includes compilation for a compile setting
        except Exception as exc:
            print(f"  {name}: failed, skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        runners[name] = runner
        print(f"  {name}: built and warmed up in {time.perf_counter() - started:.1f}s", flush=True)
    return runners

if __name__ == "__main__":
    main()
