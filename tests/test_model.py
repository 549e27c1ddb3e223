"""The network and the losses on random tensors: shapes, gradients, masking, and how weights are supplied."""

from __future__ import annotations

import pytest
import torch

from fashion_tagger.core.errors import ModelUnavailableError
from fashion_tagger.core.schema import IGNORE_INDEX
from fashion_tagger.model.network import FashionTagger, ModelError, create_backbone
from fashion_tagger.training.losses import MaskedMultiHeadLoss, ReferenceBCELoss, build_loss

NUM_CLASSES = {"gender": 3, "masterCategory": 4, "baseColour": 5}


def _model(**kwargs) -> FashionTagger:
    torch.manual_seed(0)
    return FashionTagger("test_efficientnet", NUM_CLASSES, pretrained=False, **kwargs)


def _targets(batch: int, *, masked: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for attribute, n in NUM_CLASSES.items():
        target = torch.randint(0, n, (batch,), generator=gen)
        target[torch.rand(batch, generator=gen) < masked] = IGNORE_INDEX
        out[attribute] = target
    return out


@pytest.mark.parametrize("hidden_dim", [0, 32])
def test_forward_backward_shapes_and_gradients(hidden_dim):
    model = _model(hidden_dim=hidden_dim, dropout=0.1)
    images = torch.randn(4, 3, 64, 48)
    features = model.forward_features(images)
    assert features.shape == (4, model.backbone.num_features)
    logits = model.forward_head(features)
    assert {a: tuple(v.shape) for a, v in logits.items()} == {a: (4, n) for a, n in NUM_CLASSES.items()}
    assert all(torch.isfinite(v).all() for v in logits.values())

    loss, parts = MaskedMultiHeadLoss(list(NUM_CLASSES))(model(images), _targets(4))
    assert torch.isfinite(loss) and set(parts) == set(NUM_CLASSES)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_gives_the_same_output():
    model = _model().eval()
    images = torch.randn(2, 3, 64, 48)
    expected = model(images)
    model.to(memory_format=torch.channels_last)
    got = model(images.contiguous(memory_format=torch.channels_last))
    for attribute in NUM_CLASSES:
        torch.testing.assert_close(got[attribute], expected[attribute], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("loss_fn", [
    MaskedMultiHeadLoss(list(NUM_CLASSES)),
    MaskedMultiHeadLoss(list(NUM_CLASSES), label_smoothing=0.1, attribute_weights={"gender": 2.0}),
    ReferenceBCELoss(list(NUM_CLASSES)),
])
def test_masked_rows_get_exactly_zero_gradient(loss_fn):
    torch.manual_seed(1)
    logits = {a: torch.randn(8, n, requires_grad=True) for a, n in NUM_CLASSES.items()}
    targets = _targets(8, masked=0.5, seed=3)
    loss, _ = loss_fn(logits, targets)
    loss.backward()
    for attribute, target in targets.items():
        grad = logits[attribute].grad
        masked = target == IGNORE_INDEX
        assert masked.any() and (~masked).any()
        assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
        assert grad[~masked].abs().sum() > 0


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_all_masked_batch_gives_zero_loss_without_nan(kind):
    logits = {a: torch.randn(5, n, requires_grad=True) for a, n in NUM_CLASSES.items()}
    targets = {a: torch.full((5,), IGNORE_INDEX) for a in NUM_CLASSES}
    loss, parts = build_loss(kind, list(NUM_CLASSES), label_smoothing=0.1)(logits, targets)
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    assert all(torch.equal(v.grad, torch.zeros_like(v)) for v in logits.values())


def test_masked_loss_is_the_mean_over_labelled_rows():
    logits = {a: torch.randn(6, n) for a, n in NUM_CLASSES.items()}
    targets = _targets(6, masked=0.4, seed=5)
    total, parts = MaskedMultiHeadLoss(list(NUM_CLASSES), attribute_weights={"baseColour": 0.5})(logits, targets)
    expected = {}
    for attribute, target in targets.items():
        keep = target != IGNORE_INDEX
        expected[attribute] = torch.nn.functional.cross_entropy(logits[attribute][keep], target[keep])
        torch.testing.assert_close(parts[attribute], expected[attribute])
    weighted = expected["gender"] + expected["masterCategory"] + 0.5 * expected["baseColour"]
    torch.testing.assert_close(total, weighted)


def test_reference_bce_is_one_hot_bce_times_mask():
    logits = {a: torch.randn(4, n) for a, n in NUM_CLASSES.items()}
    targets = _targets(4, masked=0.3, seed=2)
    total, _ = ReferenceBCELoss(list(NUM_CLASSES))(logits, targets)
    onehot, mask = [], []
    for attribute, n in NUM_CLASSES.items():
        target = targets[attribute]
        onehot.append(torch.stack([torch.eye(n)[t] if t >= 0 else torch.zeros(n) for t in target]))
        mask.append((target >= 0).float()[:, None].expand(-1, n))
    all_logits = torch.cat(list(logits.values()), 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(all_logits, torch.cat(onehot, 1), reduction="none")
    torch.testing.assert_close(total, (bce * torch.cat(mask, 1)).mean())


def test_unknown_attribute_weight_is_rejected():
    with pytest.raises(ValueError, match="unknown attributes: colour"):
        MaskedMultiHeadLoss(list(NUM_CLASSES), attribute_weights={"colour": 2.0})


def test_weights_from_a_local_file(tmp_path):
    source = create_backbone("test_efficientnet")
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("test_efficientnet", pretrained_path=path)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_missing_weights_file_and_unknown_backbone_say_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="pretrained_path .* does not exist"):
        create_backbone("test_efficientnet", pretrained_path=tmp_path / "nope.pth")
    with pytest.raises(ModelError, match="unknown timm backbone 'efficientnet_b99'"):
        create_backbone("efficientnet_b99")


def test_hub_failure_explains_how_to_supply_weights(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelUnavailableError) as info:  # transient: the orchestrator retries it
        create_backbone("efficientnet_b3", pretrained=True)
    assert info.value.retryable and info.value.exit_code == 75
    message = str(info.value)
    assert "model.pretrained_path" in message and "model.pretrained=false" in message
    assert "hf.co/timm/efficientnet_b3" in message
