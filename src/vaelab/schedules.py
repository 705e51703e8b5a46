"""Learning-rate schedules of the papers, as callables for ``torch.optim.lr_scheduler.LambdaLR``
(so a config can name them: ``lr_lambda: {_target_: vaelab.schedules.Burda2015}``)."""

from __future__ import annotations


class Burda2015:
    """Burda et al. (2015), section 5: for i = 0, …, 7, train 3^i passes with learning rate
    0.001 · 10^(−i/7): 3,280 passes in all. Returns the factor on the base learning rate for
    a 0-based epoch (the last stage continues past 3,280)."""

    def __init__(self, stages: int = 8):
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.stages = int(stages)

    def stage(self, epoch: int) -> int:
        end = 0
        for i in range(self.stages):
            end += 3**i
            if epoch < end:
                return i
        return self.stages - 1

    def __call__(self, epoch: int) -> float:
        return 10.0 ** (-self.stage(epoch) / 7)
