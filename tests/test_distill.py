"""KD loss (KL + CE + true JSD) and the distillation loop."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mosaic_flwr.distill.kd import distill, distill_many, jsd, kd_loss, kd_loss_parts

LN2 = math.log(2.0)


def _jsd_reference(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Textbook JSD on probabilities, in float64."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    m = (p + q) / 2
    return (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()


def test_jsd_matches_textbook_formula_and_is_symmetric():
    torch.manual_seed(0)
    p, q = torch.randn(16, 7), 3 * torch.randn(16, 7)
    value = jsd(p, q)
    assert value.item() == pytest.approx(_jsd_reference(p, q).item(), rel=1e-5)
    assert value.item() == pytest.approx(jsd(q, p).item(), rel=1e-6)
    assert 0.0 < value.item() < LN2


def test_jsd_zero_for_identical_and_ln2_for_disjoint():
    torch.manual_seed(0)
    p = torch.randn(8, 5)
    assert jsd(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert jsd(p, p + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant
    one_hot_a = 50.0 * F.one_hot(torch.tensor([0, 1, 2]), 5).float()
    one_hot_b = 50.0 * F.one_hot(torch.tensor([3, 4, 0]), 5).float()
    assert jsd(one_hot_a, one_hot_b).item() == pytest.approx(LN2, abs=1e-6)


def test_jsd_is_finite_for_saturated_logits():
    p = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[-1e4, 1e4, 0.0], [1e4, 0.0, -1e4]])
    value = jsd(p, q)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(p.grad).all()
    assert -1e-6 <= value.item() <= LN2 + 1e-6


def test_kd_loss_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    t = torch.randn(10, 6)
    assert kd_loss(t.clone(), t, a=1.0).item() == pytest.approx(0.0, abs=1e-6)
    parts = kd_loss_parts(t.clone(), t, a=0.3, T=2.0)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["jsd"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["ce"].item() > 0


def test_kd_loss_parts_exact_values():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    a, b, T = 0.8, 1.0, 2.0
    parts = kd_loss_parts(s, t, a=a, b=b, T=T)
    kl = F.kl_div(
        F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean"
    )
    ce = F.cross_entropy(s, t.argmax(1))
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["jsd"], _jsd_reference(s / T, t / T).float())
    torch.testing.assert_close(parts["loss"], a * T * T * kl + (1 - a) * ce + b * parts["jsd"])
    assert parts["loss"].item() > 0
    torch.testing.assert_close(kd_loss(s, t, a=a, b=b, T=T), parts["loss"])


def test_kd_loss_does_not_backpropagate_into_teacher():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def _toy_problem(dim: int = 8, classes: int = 4):
    torch.manual_seed(0)
    teacher = nn.Linear(dim, classes)
    with torch.no_grad():
        teacher.weight.mul_(4.0)  # a confident teacher
    student = nn.Sequential(
        nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes)
    )

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(64, dim, generator=g)
        with torch.no_grad():
            return x, teacher(x).argmax(1)

    return teacher, student, sample


def test_distill_lowers_loss_and_raises_agreement():
    teacher, student, sample = _toy_problem()
    student.train()
    messages = []
    stats = distill(
        student, teacher, sample, steps=150, lr=1e-2, log_every=50, log=messages.append,
        history_points=10,
    )
    assert len(stats["history"]) == 10 and stats["history"][-1]["step"] == 150
    assert stats["final_loss"] < 0.5 * stats["history"][0]["loss"]
    assert stats["initial_agreement"] < 0.6 < 0.9 < stats["final_agreement"]
    assert stats["teacher_label_agreement"] == 1.0
    assert len(messages) == 3 and messages[0].startswith("kd step 50/150")
    assert student.training  # mode restored


def _dropout_student(dim: int = 8, classes: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, classes))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_distill_is_the_plain_adam_loop_exactly(mode):
    """Weights, statistics and the global RNG after ``distill`` are bit-identical to a plain
    loop: per step one sample, one teacher pass, one Adam step on ``kd_loss`` (with dropout
    drawing from the global RNG in train mode)."""
    teacher, _, sample = _toy_problem()
    student = _dropout_student()
    reference = copy.deepcopy(student)
    torch.manual_seed(7)
    stats = distill(student, teacher, sample, steps=13, lr=1e-2, a=0.7, b=0.5, T=2.0,
                    student_bn=mode, history_points=100)
    rng_after = torch.get_rng_state()

    torch.manual_seed(7)
    reference.train(mode == "train")
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    losses, hits = [], 0
    for step in range(13):
        x, y = sample(step)
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(reference(x), t, a=0.7, b=0.5, T=2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        hits += int((t.argmax(1) == y).sum())
    for (k, v), w in zip(student.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(v, w), k
    assert torch.equal(rng_after, torch.get_rng_state())
    assert [h["loss"] for h in stats["history"]] == pytest.approx(losses, rel=1e-6)
    assert stats["teacher_label_agreement"] == hits / (13 * 64)


def test_distill_many_streams_one_batch_per_step_and_matches_distill_per_student():
    teacher, student, sample = _toy_problem()
    other = nn.Sequential(nn.Linear(8, 4))
    alone = {"a": copy.deepcopy(student), "b": copy.deepcopy(other)}
    calls = {"sample": [], "teacher": 0}

    def counted_sample(step):
        calls["sample"].append(step)
        return sample(step)

    def counted_teacher(x):
        calls["teacher"] += 1
        return teacher(x)

    lines = []
    together = distill_many({"a": student, "b": other}, counted_teacher, counted_sample, steps=9, lr=1e-2,
                            log_every=3, log=lambda name, line: lines.append((name, line)))
    assert calls == {"sample": list(range(9)), "teacher": 9}  # one batch and one teacher pass per step
    assert [n for n, _ in lines] == ["a", "b"] * 3 and lines[-1][1].startswith("kd step 9/9")
    for name, model in alone.items():
        stats = distill(model, teacher, sample, steps=9, lr=1e-2)
        assert {k: v for k, v in stats.items() if k != "seconds"} == \
            {k: v for k, v in together[name].items() if k != "seconds"}
        for v, w in zip(model.state_dict().values(), {"a": student, "b": other}[name].state_dict().values()):
            assert torch.equal(v, w)


@pytest.mark.parametrize("mode, changes", [("eval", False), ("train", True)])
def test_distill_student_bn_mode(mode, changes):
    teacher, student, sample = _toy_problem()
    student.eval()
    bn = student[1]
    before = bn.running_mean.clone()
    distill(student, teacher, sample, steps=3, student_bn=mode)
    assert (not torch.equal(bn.running_mean, before)) == changes
    assert not student.training


def test_distill_rejects_unknown_bn_mode():
    teacher, student, sample = _toy_problem()
    with pytest.raises(ValueError, match="student_bn"):
        distill(student, teacher, sample, steps=1, student_bn="frozen")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distill_on_cuda():
    teacher, student, sample = _toy_problem()  # sample() labels with the CPU teacher
    cuda_teacher = copy.deepcopy(teacher).cuda()
    stats = distill(student, cuda_teacher, sample, steps=20, lr=1e-2, device="cuda")
    assert next(student.parameters()).device.type == "cuda"
    assert stats["final_loss"] < stats["history"][0]["loss"]
