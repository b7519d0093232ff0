"""``dpm_adaptive(norm="batch")``: one error norm over the whole batch, as k-diffusion takes
it. The samples then step together (every batched call holds every row, and the call count
is that of one sample run alone with the batch's error), so the cost in batched calls falls,
and a sample's path depends on its batch; ``norm="sample"`` keeps them independent."""

from __future__ import annotations

import pytest
import torch

import difflab.samplers.dpm_adaptive  # noqa: F401  (registers the solver)
from difflab.errors import DifflabError
from difflab.samplers import sample
from difflab.testing import CountingDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = torch.tensor([1.0, 0.1], dtype=torch.float64)


@pytest.mark.parametrize("controller", ["dpm", "pid"])
def test_batch_norm_steps_every_sample_together(adaptive_problem, controller):
    den, x, ref = adaptive_problem
    rows = []

    class Rows(CountingDenoiser):
        def predict(self, x_in, t):
            rows.append(x_in.shape[0])
            return super().predict(x_in, t)

    out = sample("dpm_adaptive", Rows(den), x, GRID, controller=controller, norm="batch",
                 rtol=1e-3, atol=1e-4)
    assert set(rows) == {x.shape[0]}  # never a partial batch
    assert float((out - ref).abs().max()) < 1e-2
    # one sample alone with the batch-wide norm is the per-sample solver on that sample
    one = sample("dpm_adaptive", den, x[:1], GRID, controller=controller, norm="batch",
                 rtol=1e-3, atol=1e-4)
    alone = sample("dpm_adaptive", den, x[:1], GRID, controller=controller, rtol=1e-3,
                   atol=1e-4)
    assert torch.equal(one, alone)
    assert not torch.allclose(out[:1], one, rtol=0, atol=1e-12)  # the batch steers it


def test_batch_norm_needs_fewer_batched_calls(adaptive_problem):
    den, x, ref = adaptive_problem
    calls, errors = {}, {}
    for norm in ("sample", "batch"):
        counted = CountingDenoiser(den)
        out = sample("dpm_adaptive", counted, x, GRID, controller="pid", norm=norm,
                     rtol=1e-3, atol=1e-4)
        calls[norm], errors[norm] = counted.calls, float((out - ref).pow(2).mean().sqrt())
    assert calls["batch"] < calls["sample"]
    assert errors["batch"] < 1e-3 and errors["sample"] < 1e-3


def test_bad_norm_is_a_clear_error(adaptive_problem):
    den, x, _ = adaptive_problem
    with pytest.raises(DifflabError, match="norm"):
        sample("dpm_adaptive", den, x, GRID, norm="rows")
