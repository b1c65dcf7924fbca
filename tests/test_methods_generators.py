"""Per-row generators: a batch sampled with one generator per row equals each row sampled alone,
for every sampler (the evaluation batches episodes that each own a generator)."""
import pytest
import torch

from diffusion_policy.methods.diffusion import DiffusionMethod
from diffusion_policy.methods.flow import FlowMatching

METHODS = {
    "ddpm": lambda: DiffusionMethod(scheduler="ddpm", num_train_timesteps=20, num_inference_steps=20),
    "ddim": lambda: DiffusionMethod(scheduler="ddim", num_train_timesteps=20, num_inference_steps=5),
    "dpmsolver": lambda: DiffusionMethod(scheduler="dpmsolver", num_train_timesteps=20,
                                         num_inference_steps=5, clip_sample=False),
    "flow-heun": lambda: FlowMatching(integrator="heun", num_inference_steps=4),
}


@pytest.mark.parametrize("name", METHODS)
def test_list_of_generators_matches_rows_sampled_alone(name):
    method = METHODS[name]()
    net = lambda x, t, cond: 0.1 * x + cond.mean(dim=(1, 2))[:, None, None]  # noqa: E731
    cond = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    seeds = (11, 12, 13)
    batched = method.sample(net, cond, (3, 8, 2), generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = torch.cat([method.sample(net, cond[i:i + 1], (1, 8, 2), generator=torch.Generator().manual_seed(s))
                       for i, s in enumerate(seeds)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    assert not torch.allclose(batched[0], batched[1])  # different generators, different samples


def test_sampling_leaves_the_shared_scheduler_untouched():
    """Each call steps its own copy of the scheduler, so overlapping predict calls (server threads)
    cannot corrupt each other's timesteps or DPM-Solver's history."""
    method = METHODS["dpmsolver"]()
    before = method.scheduler.timesteps.clone()
    net = lambda x, t, cond: 0.1 * x  # noqa: E731
    method.sample(net, torch.zeros(2, 2, 4), (2, 8, 2), num_steps=3)
    torch.testing.assert_close(method.scheduler.timesteps, before)
    assert all(o is None for o in method.scheduler.model_outputs)
