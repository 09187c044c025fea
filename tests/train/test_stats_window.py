"""The logging window averages the statistics of the applied steps only, decided on the device,
and its checkpointed state resumes the same averages."""

import math

import torch

from hnmix.train.metrics import StatsWindow


class OneProcess:
    """The two collectives StatsWindow uses, on a single process."""

    device = torch.device("cpu")
    process_index, num_processes = 0, 1

    def reduce(self, tensor, reduction):
        return tensor

    def gather(self, tensor):
        return tensor


def stats(loss: float, **more: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss)} | {name: torch.tensor(value) for name, value in more.items()}


APPLIED, SKIPPED = torch.tensor(True), torch.tensor(False)


def test_skipped_steps_do_not_enter_the_means():
    window = StatsWindow()
    window.add(stats(2.0, acc1=0.5), APPLIED)
    window.add(stats(float("nan"), acc1=float("inf")), SKIPPED)
    window.add(stats(4.0, acc1=0.25), APPLIED)
    assert window.mean_over_processes(OneProcess()) == {"loss": 3.0, "acc1": 0.375}


def test_a_window_of_skipped_steps_only_has_no_means():
    window = StatsWindow()
    window.add(stats(float("nan")), SKIPPED)
    assert window.mean_over_processes(OneProcess()) == {}


def test_a_statistic_that_starts_mid_window_is_averaged_over_its_own_applied_steps():
    window = StatsWindow()
    window.add(stats(1.0), APPLIED)
    window.add(stats(3.0, logit_type2=6.0), APPLIED)
    window.add(stats(float("nan"), logit_type2=float("nan")), SKIPPED)
    assert window.mean_over_processes(OneProcess()) == {"loss": 2.0, "logit_type2": 6.0}


def test_without_a_decision_every_step_counts():
    window = StatsWindow()
    window.add(stats(1.0))
    window.add(stats(2.0))
    assert window.mean_over_processes(OneProcess()) == {"loss": 1.5}


def test_a_window_restored_from_its_state_logs_what_the_uninterrupted_one_does():
    steps = [(stats(2.0, acc1=0.5), APPLIED), (stats(float("nan"), acc1=math.nan), SKIPPED),
             (stats(5.0, acc1=0.75), APPLIED)]
    straight, first = StatsWindow(), StatsWindow()
    for step in steps:
        straight.add(*step)
    for step in steps[:2]:
        first.add(*step)
    resumed = StatsWindow()
    resumed.load_state(first.state(OneProcess()), torch.device("cpu"), rank=0, world=1)
    resumed.add(*steps[2])
    assert resumed.mean_over_processes(OneProcess()) == straight.mean_over_processes(OneProcess()) == {
        "loss": 3.5, "acc1": 0.625}


def test_a_state_saved_before_applied_steps_were_weighted_still_loads():
    old = {"names": ["loss"], "per_rank": [[6.0]], "counts": {"loss": 3}}
    window = StatsWindow()
    window.load_state(old, torch.device("cpu"), rank=0, world=1)
    window.add(stats(2.0), APPLIED)
    assert window.mean_over_processes(OneProcess()) == {"loss": 2.0}
