"""An implementation that breaks the GPU on purpose, for the fault-isolation sweep."""

import torch

from ringbench import Problem, register


@register(
    "cuda-fault",
    reference=None,
    description="indexes one past the end on the GPU: a device-side assert, which breaks the CUDA context",
)
def setup(problem: Problem):
    past_the_end = torch.tensor([problem.q.shape[2]], device=problem.q.device)

    def run():
        return problem.q[:, :, past_the_end]

    return run
