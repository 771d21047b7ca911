"""Class experts: weights, state averaging, and the stacked (vmap) evaluator."""

import pytest
import torch
from torch import nn

from mosaic_flwr.models.classifiers import ResNet18, build_model
from mosaic_flwr.distill.experts import (
    StackedExperts,
    build_class_experts,
    class_expert_weights,
    weighted_average_states,
)

COUNTS = torch.tensor([[2, 0, 1], [6, 0, 1]])  # 2 clients, 3 classes; nobody holds class 1


def _state(w: list[float], n: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "n": torch.tensor(n)}


def test_class_expert_weights_exact():
    weights = class_expert_weights(COUNTS)
    expected = torch.tensor([[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    assert torch.equal(weights, expected)


def test_class_expert_weights_rejects_negative_counts():
    with pytest.raises(ValueError):
        class_expert_weights(torch.tensor([[1, -1]]))


def test_weighted_average_states_exact_with_integer_buffer():
    averaged = weighted_average_states([_state([1.0, 2.0], 3), _state([3.0, 6.0], 10)], [1, 3])
    assert torch.equal(averaged["w"], torch.tensor([2.5, 5.0]))
    # 0.25 * 3 + 0.75 * 10 = 8.25 -> rounded to 8, still an integer tensor
    assert averaged["n"].dtype == torch.int64 and averaged["n"].item() == 8


def test_weighted_average_states_keeps_dtype_and_copies():
    states = [{"h": torch.tensor([1.0, 3.0], dtype=torch.float16)}] * 2
    averaged = weighted_average_states(states, torch.tensor([0.5, 0.5]))
    assert averaged["h"].dtype == torch.float16
    assert torch.equal(averaged["h"], states[0]["h"])
    assert averaged["h"] is not states[0]["h"]


def test_weighted_average_single_nonzero_weight_is_exact_copy():
    a, b = _state([0.1, 0.7], 5), _state([123.0, 9.0], 1)
    averaged = weighted_average_states([a, b], [0.0, 4.0])
    assert torch.equal(averaged["w"], b["w"]) and averaged["n"].item() == 1


@pytest.mark.parametrize(
    "states, weights",
    [
        ([], []),
        ([_state([1.0], 1), _state([1.0], 1)], [1.0]),
        ([_state([1.0], 1), _state([1.0], 1)], [1.0, -1.0]),
        ([_state([1.0], 1), _state([1.0], 1)], [0.0, 0.0]),
        ([_state([1.0], 1), {"w": torch.tensor([1.0])}], [1.0, 1.0]),
    ],
)
def test_weighted_average_states_rejects_bad_input(states, weights):
    with pytest.raises(ValueError):
        weighted_average_states(states, weights)


def test_build_class_experts_keeps_previous_for_unheld_class():
    clients = [_state([0.0, 4.0], 2), _state([8.0, 0.0], 6)]
    previous = [_state([-1.0, -1.0], 0) for _ in range(3)]
    experts = build_class_experts(clients, COUNTS, previous)
    assert len(experts) == 3
    assert torch.equal(experts[0]["w"], torch.tensor([6.0, 1.0]))  # 0.25 / 0.75
    assert experts[1] is previous[1]
    assert torch.equal(experts[2]["w"], torch.tensor([4.0, 2.0]))  # 0.5 / 0.5
    assert experts[2]["n"].item() == 4


def test_build_class_experts_falls_back_to_fedavg_without_previous():
    clients = [_state([0.0, 10.0], 0), _state([10.0, 0.0], 0)]
    experts = build_class_experts(clients, COUNTS)
    # client sample counts 3 and 7 -> weights 0.3 and 0.7
    torch.testing.assert_close(experts[1]["w"], torch.tensor([7.0, 3.0]))


def test_build_class_experts_shares_identical_experts():
    clients = [_state([1.0], 0), _state([2.0], 0)]
    experts = build_class_experts(clients, torch.tensor([[5, 3, 0], [0, 0, 2]]))
    assert experts[0] is experts[1]
    assert torch.equal(experts[2]["w"], torch.tensor([2.0]))


def _build(name: str, image_size: int) -> nn.Module:
    """``resnet18_narrow`` is the same ResNet-18 code at quarter width (fast)."""
    if name == "resnet18_narrow":
        return ResNet18(3, 5, image_size, width=0.25)
    return build_model(name, 3, 5, image_size)


def _randomised_models(name: str, n: int, image_size: int) -> list[nn.Module]:
    """Independent models in eval mode; BatchNorm statistics and affines made non-trivial."""
    models = [_build(name, image_size).eval() for _ in range(n)]
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return models


@pytest.mark.parametrize(
    "name, image_size",
    [
        ("cnn_small", 8),
        ("resnet18_narrow", 8),
        pytest.param("resnet18", 8, marks=pytest.mark.slow),
    ],
)
def test_stacked_logits_equal_per_expert_forward(name, image_size):
    torch.manual_seed(0)
    models = _randomised_models(name, 3, image_size)
    experts = StackedExperts(models[0], [m.state_dict() for m in models])
    x = torch.randn(4, 3, image_size, image_size)

    batched = experts.logits(x, loop=False)
    with torch.no_grad():
        reference = torch.stack([m(x) for m in models])
    assert batched.shape == (3, 4, 5) and not batched.requires_grad
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.logits(x, loop=True), reference, atol=1e-5, rtol=1e-5)


def test_stacked_logits_chunked_equal_unchunked():
    torch.manual_seed(0)
    models = _randomised_models("cnn_small", 5, 8)
    states = [m.state_dict() for m in models]
    x = torch.randn(2, 3, 8, 8)
    full = StackedExperts(models[0], states).logits(x, loop=False)
    chunked = StackedExperts(models[0], states, chunk=2).logits(x, loop=False)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)


def test_stacked_experts_do_not_touch_the_template():
    torch.manual_seed(0)
    models = _randomised_models("resnet18_narrow", 2, 8)
    template = models[0].train()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    experts = StackedExperts(template, [m.state_dict() for m in models])
    experts.logits(torch.randn(2, 3, 8, 8), loop=False)
    assert template.training
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())


def test_head_logits_equal_each_expert_head():
    torch.manual_seed(0)
    models = _randomised_models("cnn_small", 4, 8)
    experts = StackedExperts(models[0], [m.state_dict() for m in models])
    features = torch.randn(7, models[0].feature_dim)

    with torch.no_grad():
        reference = torch.stack([m.head(features) for m in models], dim=1)
    assert experts.head_logits(features).shape == (7, 4, 5)
    torch.testing.assert_close(experts.head_logits(features), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.head_logits(features, loop=True), reference)


def test_stacked_experts_reject_incomplete_states():
    model = build_model("cnn_small", 3, 5, 8)
    state = model.state_dict()
    del state["head.bias"]
    with pytest.raises(KeyError, match="head.bias"):
        StackedExperts(model, [state])


def test_shared_expert_states_are_evaluated_once():
    torch.manual_seed(0)
    models = _randomised_models("cnn_small", 2, 8)
    a, b = (m.state_dict() for m in models)
    experts = StackedExperts(models[0], [a, b, a, a])
    assert len(experts) == 4 and experts.num_distinct == 2
    x, features = torch.randn(3, 3, 8, 8), torch.randn(6, models[0].feature_dim)
    with torch.no_grad():
        reference = torch.stack([models[i](x) for i in (0, 1, 0, 0)])
        head_reference = torch.stack([models[i].head(features) for i in (0, 1, 0, 0)], dim=1)
    for loop in (None, False, True):
        torch.testing.assert_close(experts.logits(x, loop=loop), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            experts.head_logits(features, loop=bool(loop)), head_reference, atol=1e-5, rtol=1e-5
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_experts_on_cuda_match_cpu():
    torch.manual_seed(0)
    models = _randomised_models("resnet18_narrow", 3, 8)
    states = [m.state_dict() for m in models]
    x, features = torch.randn(4, 3, 8, 8), torch.randn(5, models[0].feature_dim)
    cpu = StackedExperts(models[0], states, device="cpu")
    cuda = StackedExperts(models[0], states, device="cuda", chunk=2)
    for loop in (False, True):
        torch.testing.assert_close(
            cuda.logits(x, loop=loop).cpu(), cpu.logits(x, loop=loop), atol=1e-4, rtol=1e-4
        )
    torch.testing.assert_close(
        cuda.head_logits(features).cpu(), cpu.head_logits(features), atol=1e-4, rtol=1e-4
    )


def test_head_experts_read_each_experts_head_on_one_backbones_features():
    """``mosaic.meta-experts='heads'``: expert e's logits are its head on the backbone's features;
    where an expert's backbone is the backbone itself, they equal the full expert's."""
    from mosaic_flwr.distill.teachers import HeadExperts

    torch.manual_seed(0)
    models = _randomised_models("cnn_small", 3, 8)
    backbone = models[0]
    x = torch.randn(5, 3, 8, 8)
    experts = StackedExperts(models[0], [m.state_dict() for m in models])
    heads = HeadExperts(experts, backbone)
    assert len(heads) == 3
    with torch.no_grad():
        feats = backbone.eval().features(x)
        reference = torch.stack([m.head(feats) for m in models])  # [E, B, C]
        full = experts.logits(x)
    torch.testing.assert_close(heads.logits(x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads.head_logits(feats), reference.permute(1, 0, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads.logits(x)[0], full[0], atol=1e-5, rtol=1e-5)  # expert 0 IS the backbone
    assert not torch.allclose(heads.logits(x)[1], full[1], atol=1e-3)             # the others differ
