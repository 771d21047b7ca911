"""Width-scaled sub-models (HeteroFL fixed / FedRolex rolling slices) and masked averaging."""

from __future__ import annotations

import pytest
import torch

from mosaic_flwr.models.classifiers import MODELS, build_model
from mosaic_flwr.distill.experts import weighted_average_states
from mosaic_flwr.core.submodels import (
    masked_average,
    model_plan,
    slice_state,
    submodel_plan,
    unslice_state,
)

GLOBAL = {"w": (4, 6), "b": (4,), "n": ()}
HALF = {"w": (2, 6), "b": (2,), "n": ()}
HALF_BOTH = {"w": (2, 3), "b": (2,), "n": ()}


def _filled(shapes, value: float, count: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full(shapes["w"], value), "b": torch.full(shapes["b"], value),
            "n": torch.tensor(count)}


def test_plan_indices_fixed_and_rolling():
    fixed = submodel_plan(GLOBAL, HALF, mode="fixed")
    assert torch.equal(fixed["w"][0], torch.tensor([0, 1])) and fixed["w"][1] is None
    assert fixed["n"] == ()
    # offset 3: rows (3 + j) % 4 -> [3, 0]; columns (3 + j) % 6 -> [3, 4, 5]
    rolling = submodel_plan(GLOBAL, HALF_BOTH, mode="rolling", offset=3)
    assert torch.equal(rolling["w"][0], torch.tensor([3, 0]))
    assert torch.equal(rolling["w"][1], torch.tensor([3, 4, 5]))
    assert torch.equal(rolling["b"][0], torch.tensor([3, 0]))
    # blocks of 2 entries: 3 units of which 2 are held, offset 5 % 3 = 2 -> units [2, 0]
    blocked = submodel_plan({"f": (2, 6)}, {"f": (2, 4)}, mode="rolling", offset=5,
                            channel_blocks={"f": (1, 2)})
    assert blocked["f"][0] is None
    assert torch.equal(blocked["f"][1], torch.tensor([4, 5, 0, 1]))


def test_masked_average_exact():
    base = {"w": torch.full((4, 6), -1.0), "b": torch.full((4,), -1.0), "n": torch.tensor(0)}
    plan_a = submodel_plan(GLOBAL, HALF, mode="fixed")  # rows {0, 1}
    plan_c = submodel_plan(GLOBAL, HALF_BOTH, mode="rolling", offset=3)  # rows {3,0} x cols 3..5
    a, b, c = _filled(HALF, 1.0, 3), _filled(GLOBAL, 4.0, 10), _filled(HALF_BOTH, 11.0, 20)
    before = [{k: v.clone() for k, v in s.items()} for s in (base, a, b, c)]

    # weights 1 (A), 3 (B, full model), 4 (C)
    out = masked_average(base, [a, b, c], [plan_a, None, plan_c], [1, 3, 4])
    abc, ab, bc, only_b = 57 / 8, 13 / 4, 56 / 7, 4.0  # (1*1 + 3*4 + 4*11) / 8, ...
    expected_w = torch.tensor([
        [ab, ab, ab, abc, abc, abc],
        [ab] * 6,
        [only_b] * 6,
        [only_b] * 3 + [bc] * 3,
    ])
    assert torch.equal(out["w"], expected_w)
    assert torch.equal(out["b"], torch.tensor([abc, ab, only_b, bc]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 14  # 113 / 8 = 14.125

    # B has weight 0: it holds nothing, so row 2 and (row 3, cols 0..2) keep base's value
    out = masked_average(base, [a, b, c], [plan_a, None, plan_c], torch.tensor([1.0, 0.0, 3.0]))
    ac = (1 + 33) / 4
    expected_w = torch.tensor([
        [1.0, 1.0, 1.0, ac, ac, ac],
        [1.0] * 6,
        [-1.0] * 6,
        [-1.0] * 3 + [11.0] * 3,
    ])
    assert torch.equal(out["w"], expected_w)
    assert torch.equal(out["b"], torch.tensor([ac, 1.0, -1.0, 11.0]))
    assert out["n"].item() == 16  # (3 + 3 * 20) / 4 = 15.75

    for original, now in zip(before, (base, a, b, c)):  # inputs untouched
        assert all(torch.equal(original[k], now[k]) for k in original)
    assert out["w"].data_ptr() != base["w"].data_ptr()


def test_masked_average_keeps_dtype():
    base = {"w": torch.zeros(4, 6, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.float64),
            "n": torch.tensor(0, dtype=torch.int32)}
    sub = {"w": torch.ones(2, 6, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.float64),
           "n": torch.tensor(5, dtype=torch.int32)}
    out = masked_average(base, [sub], [submodel_plan(GLOBAL, HALF)], [2.0])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in base.items()}
    assert torch.equal(out["w"][:2], torch.ones(2, 6, dtype=torch.bfloat16))
    assert torch.equal(out["w"][2:], torch.zeros(2, 6, dtype=torch.bfloat16))
    assert out["n"].item() == 5


def test_masked_average_full_plans_equals_weighted_average():
    torch.manual_seed(0)
    states = [build_model("resnet8", 1, 10, 28).state_dict() for _ in range(3)]
    for i, state in enumerate(states):
        state["stages.0.0.bn1.num_batches_tracked"].fill_(3 * i + 1)
    full_plan = model_plan(build_model("resnet8", 1, 10, 28), build_model("resnet8", 1, 10, 28))
    assert all(d is None for dims in full_plan.values() for d in dims)
    weights = [0.5, 0.0, 2.0]
    expected = weighted_average_states(states, weights)
    base = build_model("resnet8", 1, 10, 28).state_dict()
    for plans in ([None] * 3, [full_plan] * 3):
        out = masked_average(base, states, plans, weights)
        assert out.keys() == expected.keys()
        for key in expected:
            assert out[key].dtype == expected[key].dtype
            assert torch.allclose(out[key], expected[key], atol=1e-6), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_slice_unslice_round_trip_and_loads(name):
    torch.manual_seed(0)
    full = build_model(name, 1, 10, 28)
    state = full.state_dict()
    for width in (0.5, 0.25):
        sub = build_model(name, 1, 10, 28, width=width)
        for mode, offset in (("fixed", 0), ("rolling", 5), ("rolling", 1001)):
            plan = model_plan(full, sub, mode=mode, offset=offset)
            sliced = slice_state(state, plan)
            sub.load_state_dict(sliced, strict=True)
            assert all(t.is_contiguous() for t in sliced.values())
            back = unslice_state(sliced, plan, like=state)
            assert all(torch.equal(back[k], state[k]) for k in state), (name, width, mode)
            assert back["head.weight"].data_ptr() != state["head.weight"].data_ptr()
    # unslicing into zeros writes exactly the sliced entries (last plan: rolling, 0.25)
    key = next(k for k in state if k.endswith("conv2.weight"))
    zeros = unslice_state(sliced, plan, like={k: torch.zeros_like(v) for k, v in state.items()})
    assert zeros[key].count_nonzero() == sliced[key].count_nonzero() > 0


def _zero_unheld(state, plan):
    """The full state with every entry the plan does not hold zeroed (BatchNorm variance 1),
    so unheld channels output exactly 0 and contribute nothing downstream."""
    like = {k: (torch.ones_like(v) if k.endswith("running_var") else torch.zeros_like(v))
            for k, v in state.items()}
    return unslice_state(slice_state(state, plan), plan, like=like)


@pytest.mark.parametrize("name", ["cnn_small", "resnet8"])
@pytest.mark.parametrize("mode,offset", [("fixed", 0), ("rolling", 5)])
def test_sub_model_matches_full_model_with_unheld_entries_zeroed(name, mode, offset):
    torch.manual_seed(1)
    full = build_model(name, 1, 10, 28).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in full.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    sub = build_model(name, 1, 10, 28, width=0.5).eval()
    plan = model_plan(full, sub, mode=mode, offset=offset)
    full.load_state_dict(_zero_unheld(full.state_dict(), plan))
    sub.load_state_dict(slice_state(full.state_dict(), plan))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected, got = full(x), sub(x)
    assert expected.abs().max() > 1e-3  # not trivially zero
    assert torch.allclose(got, expected, atol=1e-5)


def test_plan_errors():
    with pytest.raises(ValueError, match=r"keys differ.*'b'"):
        submodel_plan(GLOBAL, {"w": (2, 6), "n": ()})
    with pytest.raises(ValueError, match=r"'w' dim 1.*7 exceeds global size 6"):
        submodel_plan(GLOBAL, {"w": (4, 7), "b": (4,), "n": ()})
    with pytest.raises(ValueError, match=r"'w'.*different ranks"):
        submodel_plan(GLOBAL, {"w": (4,), "b": (4,), "n": ()})
    with pytest.raises(ValueError, match=r"'w' dim 1: block size 4 does not divide"):
        submodel_plan(GLOBAL, HALF_BOTH, channel_blocks={"w": (1, 4)})
    with pytest.raises(ValueError, match=r"unknown mode 'random'.*fixed.*rolling"):
        submodel_plan(GLOBAL, HALF, mode="random")


def test_masked_average_errors():
    base = _filled(GLOBAL, 0.0, 0)
    plan = submodel_plan(GLOBAL, HALF)
    for bad in ([-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0], [1.0]):
        with pytest.raises(ValueError, match="weights"):
            masked_average(base, [base, _filled(HALF, 1.0, 1)], [None, plan], bad)
    with pytest.raises(ValueError, match=r"client 1 'w' has shape \(4, 6\).*\(2, 6\)"):
        masked_average(base, [base, base], [None, plan], [1, 1])
    with pytest.raises(ValueError, match="different keys"):
        masked_average(base, [{"w": base["w"]}], [None], [1])
    with pytest.raises(ValueError, match="2 states but 1 plans"):
        masked_average(base, [base, base], [None], [1, 1])
