"""The math of hnmix on CUDA: `mix_logits` against the float64 oracle, the batched photometric
half against its CPU result. Marked `cuda` and skipped without a GPU (the GPU check runs them).

The CPU tests (tests/method/test_mixing.py, tests/data/test_photometric.py) hold the references;
their inputs and error measures are reused here so that the GPU is held to the same standard.
"""

import oracle
import pytest
import torch
from data.test_photometric import ONE_LEVEL, unnormalise, varied_images
from method.test_mixing import SIZES, make_inputs, relative_error

from hnmix import mixing
from hnmix.data.photometric import (
    StepPhotometric,
    apply_photometric,
    photometric_params,
)
from hnmix.mixing import draw_mixing, mix_logits

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# The sizes of the CPU tests, and one nearer the trainer's (several hard negatives per row of B).
CUDA_SIZES = [*SIZES, (64, 2048, 128, 128, 64, 32)]


@pytest.fixture
def oracle_draws_on_cuda(monkeypatch):
    """The oracle takes its mixing draws from a CUDA generator, as `mix_logits` on CUDA does
    (`draw_mixing` draws on the generator's device), and mixes them on the host in float64."""

    def draws(n_valid, s1, s2, generator):
        drawn = draw_mixing(n_valid.to(generator.device), s1, s2, generator)
        return type(drawn)(*(t.cpu() for t in drawn))

    monkeypatch.setattr(oracle, "draw_mixing", draws)


def cuda_against_oracle(q, k, queue, *, autocast, **kwargs):
    """(relative error of the logits, of the q-gradient) of `mix_logits` on CUDA against the
    float64 oracle on the host; q, k, queue: CPU tensors [B, d], [B, d], [K, d]; ids and
    queue_ids in kwargs, on the host. Both sides draw from a CUDA generator seeded 7; the
    gradient is that of a fixed random weighting of the logits."""
    on_cuda = {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    q_oracle = q.double().requires_grad_()
    q_fast = q.clone().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        fast = mix_logits(q_fast, k.cuda(), queue.cuda(), generator=torch.Generator("cuda").manual_seed(7),
                          **on_cuda).logits
    expected, _ = oracle.oracle_logits(q_oracle, k, queue, generator=torch.Generator("cuda").manual_seed(7), **kwargs)
    assert fast.dtype == torch.float32 and fast.shape == expected.shape
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = weights.masked_fill(~torch.isfinite(expected), 0)
    (fast * weights.float().cuda()).sum().backward()
    (expected * weights).sum().backward()
    assert q_fast.grad.dtype == q.dtype
    return relative_error(fast.cpu(), expected), relative_error(q_fast.grad.cpu(), q_oracle.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,d,n_hard,s1,s2", CUDA_SIZES)
def test_mix_logits_on_cuda_match_the_float64_oracle(B, K, d, n_hard, s1, s2, dtype, oracle_draws_on_cuda):
    """float32 inputs, and bf16 inputs under bf16 autocast as the encoders give them in training:
    float32 logits within 1e-6 of the oracle (CUDA's autocast must not lower the math), the
    gradient within 1e-6, or bf16's rounding of a bf16 leaf's gradient."""
    q, k, queue, ids, queue_ids = make_inputs(B, K, d, dtype=dtype)
    errors = cuda_against_oracle(q, k, queue, autocast=dtype == torch.bfloat16, temperature=0.07, n_hard=n_hard,
                                 s1=s1, s2=s2, ids=ids, queue_ids=queue_ids)
    assert errors[0] <= 1e-6
    assert errors[1] <= (1e-6 if dtype == torch.float32 else 2.0**-8)


def test_type1_dot_products_in_several_chunks_on_cuda_match_the_oracle(monkeypatch, oracle_draws_on_cuda):
    B, K, d, s1 = 8, 64, 16, 5
    monkeypatch.setattr(mixing, "_pair_chunk_elements", lambda device: 3 * 2 * s1 * d)  # chunks of 3, 3, 2 rows
    q, k, queue, ids, queue_ids = make_inputs(B, K, d)
    errors = cuda_against_oracle(q, k, queue, autocast=False, temperature=0.07, n_hard=10, s1=s1, s2=3, ids=ids,
                                 queue_ids=queue_ids)
    assert max(errors) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_photometric_on_cuda_equals_the_cpu_within_one_level(seed):
    """Every op (jitter in random orders, grayscale, blur, normalisation) on the content that
    stresses it: the CUDA result is the CPU result within 1/255 per pixel before normalisation."""
    images = torch.cat([varied_images(seed=seed)] * 4)  # [32, 3, 32, 32]
    params = photometric_params(len(images), 32, generator=torch.Generator().manual_seed(seed))
    assert params.jitter_applied.any() and params.grayscale.any() and params.blur_applied.any()
    on_cpu = unnormalise(apply_photometric(images, params))
    on_cuda = unnormalise(apply_photometric(images.cuda(), params).cpu())
    assert (on_cuda - on_cpu).abs().max().item() <= ONE_LEVEL


def test_step_photometric_on_cuda_equals_the_cpu_at_the_trainers_size():
    """The trainer's call (both views of a batch of 64 at 224 px, parameters from (seed, step,
    rank)) gives on CUDA what it gives on the CPU, within 1/255, as float32."""
    generator = torch.Generator().manual_seed(0)
    shape = (64, 3, 224, 224)
    view_q, view_k = (torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(2))
    photometric = StepPhotometric(224, seed=1, rank=0)
    cpu_q, cpu_k = photometric(view_q, view_k, step=3)
    cuda_q, cuda_k = photometric(view_q.cuda(), view_k.cuda(), step=3)
    assert cuda_q.device.type == "cuda" and cuda_q.dtype == torch.float32 and cuda_q.shape == cpu_q.shape
    for on_cpu, on_cuda in ((cpu_q, cuda_q), (cpu_k, cuda_k)):
        assert (unnormalise(on_cuda.cpu()) - unnormalise(on_cpu)).abs().max().item() <= ONE_LEVEL
