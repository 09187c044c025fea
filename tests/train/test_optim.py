"""hnmix.train.optim: fused/foreach AdamW with timm's groups, and the sync-free non-finite step guard."""

import copy

import pytest
import torch
from timm.optim import create_optimizer_v2

from hnmix.errors import TrainingDivergedError
from hnmix.moco import MoCo, MoCoEncoder
from hnmix.train.optim import (
    NonFiniteGuard,
    fused_available,
    innermost_optimizer,
    make_optimizer,
)
from hnmix.train.hold_back import batchnorm_statistics, restore_batchnorm_statistics, save_batchnorm_statistics

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: 1 thread is faster


def small_moco():
    torch.manual_seed(0)
    return MoCo(MoCoEncoder("test_resnet", 8), dim_moco=8, k_moco=16, m_moco=0.9, t_moco=0.2)


def set_grads(moco, seed, poison=None):
    """Random gradients for the query encoder; `poison` (inf or NaN) in one of them."""
    generator = torch.Generator().manual_seed(seed)
    for p in moco.encoder_q.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    if poison is not None:
        next(moco.encoder_q.parameters()).grad.view(-1)[0] = poison


def grad_norm(moco):
    return torch.nn.utils.clip_grad_norm_(moco.encoder_q.parameters(), 1.0)


def snapshot(moco, optimizer):
    """Everything a step may change: both encoders and the optimizer state (moments, step counters)."""
    return copy.deepcopy((moco.state_dict(), optimizer.state_dict()["state"]))


def assert_same(a, b):
    (model_a, state_a), (model_b, state_b) = a, b
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for name, value in state_a[index].items():
            assert torch.equal(value, state_b[index][name]), (index, name)


def adamw(moco, fused):
    return torch.optim.AdamW(moco.encoder_q.parameters(), lr=0.01, fused=fused, foreach=not fused)


def test_make_optimizer_is_fused_adamw_on_cpu_with_timms_no_decay_groups():
    moco = small_moco()
    optimizer = make_optimizer(moco.encoder_q, lr=0.03, weight_decay=0.01, device="cpu")
    timms = create_optimizer_v2(moco.encoder_q, opt="adamw", lr=0.03, weight_decay=0.01)
    assert type(optimizer) is torch.optim.AdamW
    assert fused_available("cpu") and all(group["fused"] for group in optimizer.param_groups)
    assert [([id(p) for p in g["params"]], g["weight_decay"], g["lr"]) for g in optimizer.param_groups] == \
           [([id(p) for p in g["params"]], g["weight_decay"], g["lr"]) for g in timms.param_groups]
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in moco.encoder_q.named_parameters():
        assert decays[id(p)] == (0.0 if p.ndim <= 1 else 0.01), name  # biases and norms: no decay


def test_make_optimizer_falls_back_to_foreach_where_fused_is_unsupported():
    optimizer = make_optimizer(small_moco().encoder_q, lr=0.03, weight_decay=0.01, device="meta")
    assert not fused_available("meta")
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)


@pytest.mark.parametrize("fused", [True, False])
def test_guard_skips_exactly_the_nonfinite_steps(fused):
    guarded, reference = small_moco(), small_moco()
    optimizer, reference_optimizer = adamw(guarded, fused), adamw(reference, fused)
    guard = NonFiniteGuard(optimizer, 10, device="cpu")
    assert guard.fused == fused
    for seed, poison in enumerate([NAN, None, None, INF, NAN, None, NAN, None]):
        before = snapshot(guarded, optimizer)
        set_grads(guarded, seed, poison)
        applied = guard.step(grad_norm(guarded))
        guarded.momentum_update(applied)
        assert applied.dtype == torch.bool and applied.item() == (poison is None)
        if poison is not None:
            if before[1]:
                assert_same(snapshot(guarded, optimizer), before)
            else:  # a skipped first step: parameters as they were, a fresh optimizer state
                assert_same((guarded.state_dict(), {}), (before[0], {}))
                assert all(v.count_nonzero() == 0 for s in optimizer.state.values() for v in s.values())
            continue
        assert not torch.equal(guarded.encoder_k.state_dict()["head.0.weight"], before[0]["encoder_k.head.0.weight"])
        set_grads(reference, seed)
        grad_norm(reference)
        reference_optimizer.step()
        reference.momentum_update()
        assert_same(snapshot(guarded, optimizer), snapshot(reference, reference_optimizer))
    assert next(iter(optimizer.state.values()))["step"].item() == 4


def test_guard_counts_skipped_steps_and_the_current_run():
    moco = small_moco()
    guard = NonFiniteGuard(adamw(moco, True), 10, device="cpu")
    for seed, poison in enumerate([NAN, INF, None, NAN, None, INF, NAN]):
        set_grads(moco, seed, poison)
        guard.step(grad_norm(moco))
    assert guard.state() == {"skipped_steps": 5, "nonfinite_in_a_row": 2}
    assert guard.check(7) == 5


def test_check_raises_once_the_run_reaches_the_limit_naming_its_step():
    moco = small_moco()
    guard = NonFiniteGuard(adamw(moco, True), 3, device="cpu")
    # Steps 1..9: the run of steps 4, 5, 6, 7 reaches the limit at step 6; finite steps follow.
    for seed, poison in enumerate([None, NAN, None, NAN, INF, NAN, NAN, None, None]):
        set_grads(moco, seed, poison)
        guard.step(grad_norm(moco))
        if seed == 4:
            assert guard.check(seed + 1) == 3  # two in a row so far: no error
    with pytest.raises(TrainingDivergedError, match=r"^3 steps in a row up to step 6 had a non-finite loss or "
                       r"gradient; the last good checkpoint is out/checkpoints/checkpoint_5: resume from it"):
        guard.check(9, "out/checkpoints/checkpoint_5")
    with pytest.raises(TrainingDivergedError, match="last good checkpoint is none \\(no checkpoint yet\\)"):
        guard.check(9, None)


def test_guard_state_round_trips_through_plain_ints():
    moco = small_moco()
    guard = NonFiniteGuard(adamw(moco, True), 3, device="cpu")
    guard.load_state({"skipped_steps": 7, "nonfinite_in_a_row": 2})
    set_grads(moco, 0, NAN)
    guard.step(grad_norm(moco))  # the third in a row, counting the one before the checkpoint
    with pytest.raises(TrainingDivergedError, match="up to step 11"):
        guard.check(11)
    resumed = NonFiniteGuard(adamw(moco, True), 3, device="cpu")
    resumed.load_state({"skipped_steps": 4})  # a checkpoint from before the run length was saved
    assert resumed.state() == {"skipped_steps": 4, "nonfinite_in_a_row": 0}


@pytest.fixture
def no_host_reads(monkeypatch):
    """Inside the `with`, reading a tensor's value on the host raises."""

    class Forbidden:
        def __enter__(self):
            def refuse(self, *args, **kwargs):
                raise AssertionError("host read of a tensor inside the step")

            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                monkeypatch.setattr(torch.Tensor, name, refuse)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Forbidden()


def test_fused_guarded_step_reads_nothing_on_the_host(no_host_reads):
    moco = small_moco()
    guard = NonFiniteGuard(adamw(moco, True), 2, device="cpu")
    for seed, poison in enumerate([None, NAN, INF, None]):
        set_grads(moco, seed, poison)
        norm = grad_norm(moco)
        with no_host_reads:
            moco.momentum_update(guard.step(norm))
    assert guard.state()["skipped_steps"] == 2


def test_a_whole_guarded_step_with_its_enqueue_and_restore_reads_nothing_on_the_host(no_host_reads):
    moco = small_moco()
    guard = NonFiniteGuard(adamw(moco, True), 2, device="cpu")
    views = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for poison in (None, NAN):
        saved = save_batchnorm_statistics(batchnorm_statistics(moco))
        loss, _, keys = moco(views[0], views[1], torch.arange(4), enqueue=False)
        (loss * poison if poison is not None else loss).backward()
        norm = grad_norm(moco)
        with no_host_reads:
            applied = guard.step(norm)
            moco.momentum_update(applied)
            moco.queue.enqueue(*keys, apply=applied)
            restore_batchnorm_statistics(batchnorm_statistics(moco), saved, unless=applied)
        moco.encoder_q.zero_grad()
    assert moco.queue.ptr.item() == 4  # the NaN step enqueued nothing


def test_non_fused_guard_falls_back_to_a_host_read(no_host_reads):
    moco = small_moco()
    guard = NonFiniteGuard(adamw(moco, False), 2, device="cpu")
    set_grads(moco, 0)
    norm = grad_norm(moco)
    with no_host_reads, pytest.raises(AssertionError, match="host read"):
        guard.step(norm)


def test_found_inf_lands_on_the_wrapped_optimizer_for_the_step_only():
    from accelerate import Accelerator

    moco = small_moco()
    optimizer = Accelerator(cpu=True).prepare(adamw(moco, True))
    inner = innermost_optimizer(optimizer)
    assert inner is not optimizer and isinstance(inner, torch.optim.AdamW)
    seen = []
    inner.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.found_inf.clone()))
    guard = NonFiniteGuard(optimizer, 2, device="cpu")
    for seed, poison in enumerate([None, NAN]):
        set_grads(moco, seed, poison)
        guard.step(grad_norm(moco))
    assert [t.dtype for t in seen] == [torch.float32] * 2 and [t.item() for t in seen] == [0.0, 1.0]
    assert not hasattr(inner, "found_inf")
    assert next(iter(inner.state.values()))["step"].item() == 1


def test_under_a_grad_scaler_the_guard_counts_the_steps_the_scaler_skips():
    """fp16: the GradScaler skips a step with inf/NaN gradients itself; the guard steps the
    optimizer every time and counts, so skipped_steps and max_nonfinite_steps hold under fp16."""
    from accelerate.optimizer import AcceleratedOptimizer

    moco = small_moco()
    optimizer = AcceleratedOptimizer(adamw(moco, True), scaler=torch.amp.GradScaler("cpu"))
    guard = NonFiniteGuard(optimizer, 2, device="cpu")
    assert guard.scaler_skips
    stepped = []
    optimizer.step = lambda *args, **kwargs: stepped.append(1)  # what the scaler would decide is its business
    for seed, poison in enumerate([None, NAN, INF]):
        set_grads(moco, seed, poison)
        assert guard.step(grad_norm(moco)).item() == (poison is None)
    assert len(stepped) == 3
    with pytest.raises(TrainingDivergedError, match="2 steps in a row up to step 3"):
        guard.check(3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_guarded_step_does_not_synchronise_on_cuda():
    moco = small_moco().cuda()
    optimizer = make_optimizer(moco.encoder_q, lr=0.01, weight_decay=0.01, device="cuda")
    guard = NonFiniteGuard(optimizer, 2, device="cuda")
    for seed, poison in enumerate([None, NAN, None]):
        set_grads(moco, seed, poison)
        for p in moco.encoder_q.parameters():
            p.grad = p.grad.cuda()
        norm = grad_norm(moco)
        torch.cuda.set_sync_debug_mode("error")
        try:
            moco.momentum_update(guard.step(norm))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert guard.check(3) == 1


def test_sgd_is_torchs_fused_momentum_sgd_without_nesterov_and_with_timms_groups():
    moco = small_moco()
    optimizer = make_optimizer(moco.encoder_q, name="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, device="cpu")
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert group["fused"] and not group["nesterov"] and group["momentum"] == 0.9 and group["lr"] == 0.03
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in moco.encoder_q.named_parameters():
        assert decays[id(p)] == (0.0 if p.ndim <= 1 else 1e-4), name


def test_lars_adapts_only_the_groups_with_weight_decay():
    from timm.optim import Lars

    moco = small_moco()
    optimizer = make_optimizer(moco.encoder_q, name="lars", lr=0.1, weight_decay=1e-6, momentum=0.9, device="cpu")
    assert type(optimizer) is Lars
    assert all(not g["always_adapt"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-6]  # no decay, no trust ratio
    assert not NonFiniteGuard(optimizer, 3, device="cpu").fused  # no fused kernel: one host read per step


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_guard_skips_nonfinite_steps_with_every_optimizer_leaving_momentum_buffers_alone(name):
    moco = small_moco()
    optimizer = make_optimizer(moco.encoder_q, name=name, lr=0.05, weight_decay=1e-4, momentum=0.9, device="cpu")
    guard = NonFiniteGuard(optimizer, 10, device="cpu")
    assert guard.fused == (name == "sgd")
    for seed, poison in enumerate([None, NAN, None, INF]):
        before = snapshot(moco, optimizer)
        set_grads(moco, seed, poison)
        applied = guard.step(grad_norm(moco))
        moco.momentum_update(applied)
        if poison is None:
            assert not torch.equal(moco.encoder_q.head[0].weight, before[0]["encoder_q.head.0.weight"])
        else:
            assert_same(snapshot(moco, optimizer), before)
    assert guard.state()["skipped_steps"] == 2


def test_fused_sgd_guarded_step_reads_nothing_on_the_host(no_host_reads):
    moco = small_moco()
    optimizer = make_optimizer(moco.encoder_q, name="sgd", lr=0.05, weight_decay=1e-4, device="cpu")
    guard = NonFiniteGuard(optimizer, 2, device="cpu")
    for seed, poison in enumerate([None, NAN, None]):
        set_grads(moco, seed, poison)
        norm = grad_norm(moco)
        with no_host_reads:
            moco.momentum_update(guard.step(norm))
    assert guard.state()["skipped_steps"] == 1
