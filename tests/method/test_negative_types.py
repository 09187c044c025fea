"""A new synthetic negative type is one `NegativeType`: registered here only, SynCo's extrapolation
normalise(q + λ(q - n)), λ ~ U(0.2, 0.8), is x = q, y = n, a = 1 + λ. It matches a float64 oracle,
and passes through training, statistics, the model card and the curves with no edit elsewhere."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_logits
from tiny_run import TINY, metrics

from hnmix.bench.mixing import materialised_mochi_logits
from hnmix.mixing import (
    NEGATIVE_TYPES,
    NegativeType,
    active_types,
    draw_types,
    mix_logits,
    register_negative_type,
    validate_mixing_sizes,
)
from launch import REPO

EXTRAPOLATION = NegativeType("extrapolation", "extrapolation", "s3", "query", (1.2, 1.8), "a hard negative",
                             "query extrapolated away from a hard negative", "s3_hard", "start3_hard")


@pytest.fixture
def extrapolation():
    register_negative_type(EXTRAPOLATION)
    yield EXTRAPOLATION
    del NEGATIVE_TYPES[EXTRAPOLATION.name]


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).float()


def inputs(B=6, K=40, d=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(B)
    queue_ids = torch.where(torch.rand(K, generator=g) < 0.25, torch.randint(0, B, (K,), generator=g), -1)
    return unit(B, d, generator=g), unit(B, d, generator=g), unit(K, d, generator=g), ids, queue_ids


def extrapolation_oracle(q, k, queue, *, temperature, n_hard, s3, ids, queue_ids, generator):
    """[B, 1 + K + s3] float64: MoCo's logits from tests/oracle.py, then each h built as a vector."""
    logits, hard = oracle_logits(q, k, queue, temperature=temperature, n_hard=n_hard, ids=ids, queue_ids=queue_ids)
    n_valid = (hard >= 0).sum(1)
    _, single, lam_plus_one = draw_types(n_valid, active_types({"s3": s3}), generator).of("extrapolation")
    q, queue = q.double(), queue.double()
    rows = []
    for b in range(q.shape[0]):
        row = []
        for t in range(s3):
            if n_valid[b] < 1:
                row.append(q.new_tensor(float("-inf")))
                continue
            lam = lam_plus_one[b, t].double() - 1
            n = queue[hard[b, single[b, t]]]
            h = q[b].detach() + lam * (q[b].detach() - n)
            row.append(q[b] @ (h / h.norm()) / temperature)
        rows.append(torch.stack(row))
    return torch.cat([logits, torch.stack(rows)], dim=1)


def test_extrapolation_logits_and_gradient_match_a_float64_oracle(extrapolation):
    q, k, queue, ids, queue_ids = inputs()
    kwargs = dict(temperature=0.1, n_hard=5, ids=ids, queue_ids=queue_ids)
    q_fast, q_oracle = q.clone().requires_grad_(), q.double().requires_grad_()
    fast = mix_logits(q_fast, k, queue, s3=4, generator=torch.Generator().manual_seed(7), **kwargs).logits
    expected = extrapolation_oracle(q_oracle, k, queue, s3=4, generator=torch.Generator().manual_seed(7), **kwargs)
    assert fast.shape == (6, 1 + 40 + 4)
    torch.testing.assert_close(fast.double(), expected, rtol=1e-6, atol=1e-5)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = weights.masked_fill(~torch.isfinite(expected), 0)
    (fast * weights.float()).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(q_fast.grad.double(), q_oracle.grad, rtol=1e-5, atol=1e-5)


def test_all_three_types_together_match_the_materialising_implementation(extrapolation):
    q, k, queue, ids, queue_ids = inputs()
    sizes = dict(temperature=0.1, n_hard=5, s1=3, s2=2, s3=4, ids=ids, queue_ids=queue_ids)
    q_fast, q_slow = q.clone().requires_grad_(), q.clone().requires_grad_()
    fast = mix_logits(q_fast, k, queue, generator=torch.Generator().manual_seed(1), **sizes).logits
    slow = materialised_mochi_logits(q_slow, k, queue, generator=torch.Generator().manual_seed(1), **sizes)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    finite = torch.isfinite(fast)
    fast.masked_fill(~finite, 0).sum().backward()
    slow.masked_fill(~finite, 0).sum().backward()
    torch.testing.assert_close(q_fast.grad, q_slow.grad, rtol=1e-4, atol=1e-5)


def test_a_type_needing_more_hard_negatives_than_there_are_is_refused_naming_its_size(extrapolation):
    q, k, queue, *_ = inputs()
    with pytest.raises(ValueError, match="s3 > 0 mixes a hard negative: n_hard must be >= 1, got 0"):
        mix_logits(q, k, queue, temperature=0.1, s3=2)


def train_with_extrapolation(dir_out: str) -> int:
    """A tiny run (hnmix.train.loop.train) whose config has the extrapolation's two options, from step 1."""
    from hnmix.train.config import MethodConfig, negative_type_options, parse_config
    from hnmix.train.loop import train

    register_negative_type(EXTRAPOLATION)
    # The method group as hnmix.train.config builds it for the registered types, had it been registered before.
    method_type = dataclasses.make_dataclass("WithExtrapolation", negative_type_options(EXTRAPOLATION),
                                             bases=(MethodConfig,), frozen=True)
    base = parse_config([*TINY, "-s", "4", "-sp", "1", "-ss", "4", "--num_workers", "0", "-do", dir_out])
    method = method_type(**dataclasses.asdict(base.method), s3_hard=4, start3_hard="1")
    return train(dataclasses.replace(base, method=method))


def test_a_size_no_registered_type_has_is_refused_naming_it_and_the_known_ones():
    """A misspelt size (s3 without the extrapolation registered) must not be a silent no-op."""
    with pytest.raises(TypeError) as error:
        active_types({"s1": 2, "s3": 1})
    assert str(error.value) == "unknown mixing sizes ['s3']; the registered ones are ['s1', 's2']"
    with pytest.raises(TypeError) as error:
        validate_mixing_sizes(queue_size=64, temperature=0.1, n_hard=4, s1_hard=2, s3_hard=1)
    assert str(error.value) == "unknown mixing sizes ['s3_hard']"
    register_negative_type(EXTRAPOLATION)
    try:
        validate_mixing_sizes(queue_size=64, temperature=0.1, n_hard=4, s1_hard=2, s3_hard=1)
        assert [kind.size for kind, _ in active_types({"s1": 2, "s3": 1})] == ["s1", "s3"]
    finally:
        del NEGATIVE_TYPES[EXTRAPOLATION.name]


def test_a_run_trains_reports_and_draws_the_registered_type(tmp_path, extrapolation):
    from huggingface_hub import ModelCard

    from hnmix.pictures.curves import curves_figure, load_run, method_of

    code = f"import test_negative_types as t; raise SystemExit(t.train_with_extrapolation({str(tmp_path)!r}))"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests/method")]),
                        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    records = metrics(tmp_path)
    assert "logit_extrapolation" not in records[0] and all("logit_extrapolation" in r for r in records[1:])
    assert [r["s3_in_use"] for r in records] == [0, 4, 4, 4]
    card = ModelCard.load(tmp_path / "encoder/README.md").text
    assert "| `s3_hard` | 4 | extrapolation synthetic negatives per query (query extrapolated" in card
    assert "extrapolation (4 per query) from step 1" in card
    run = load_run(tmp_path)
    assert method_of(run.config) == "MoCHi (N=8, s1=4, s2=4, s3=4)"
    figure = curves_figure([run])
    assert [line for line in figure.axes[3].get_lines() if line.get_label() == "extrapolation synthetic"]
