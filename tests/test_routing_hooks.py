"""The optional router hooks are declared on :class:`Router`: every router kind has them, the defaults do nothing, and
callers reach overrides without probing for them."""

from __future__ import annotations

import torch
from torch import nn

from c2r.routing import ROUTER_CLASSES, Router, RouterConfig, TopKRouter, after_optimizer_step, router_class


def test_every_router_kind_derives_from_router():
    for kind in ROUTER_CLASSES:
        assert issubclass(router_class(kind), Router), kind


def test_default_hooks_change_nothing():
    router = TopKRouter(4, 4, 2, RouterConfig())
    before = {k: v.clone() for k, v in router.state_dict().items()}
    router.set_expert_placement([1, 1, 0, 0], num_ranks=2)
    router.init_from_pretrained({"kind": "remoe"})
    assert TopKRouter.update_after_step([router]) == {}
    assert after_optimizer_step(router) == {}
    assert all(torch.equal(before[k], v) for k, v in router.state_dict().items())


class CountingRouter(TopKRouter):
    """Counts optimizer steps, to see that ``after_optimizer_step`` hands every instance of a class over at once."""

    def __init__(self):
        super().__init__(4, 4, 2, RouterConfig())
        self.steps = 0

    @classmethod
    def update_after_step(cls, routers, group=None):
        for router in routers:
            router.steps += 1
        return {"counting_routers": float(len(routers))}


def test_after_optimizer_step_calls_each_class_override_once_with_all_instances():
    model = nn.ModuleList([CountingRouter(), TopKRouter(4, 4, 2, RouterConfig()), CountingRouter()])
    assert after_optimizer_step(model) == {"counting_routers": 2.0}
    assert [getattr(m, "steps", None) for m in model] == [1, None, 1]


def test_every_router_gives_an_empty_batch_a_zero_aux_loss(tmp_path):
    """A rank or micro-batch with no tokens: every router's aux loss is 0 (it was NaN, a mean over no tokens, which
    stops a run as diverged), in training and evaluation, for k = 1 and k = E."""
    import numpy as np

    from c2r.routing.config import AdaMoEConfig, C2RConfig, ScoredConfig
    from tests.router_helpers import write_lists

    E, D = 8, 16
    lists = write_lists(tmp_path / "lists.npz", np.random.default_rng(0).integers(0, 50, (2, E, E)))
    configs = [
        RouterConfig(z_loss_weight=1e-3),
        RouterConfig(balance="batch"),
        RouterConfig(kind="c2r", c2r=C2RConfig(collaborators=lists, top_t=E - 1)),
        RouterConfig(kind="group_limited"),
        RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=4)),
        RouterConfig(kind="remoe"),
        RouterConfig(kind="adak"),
        RouterConfig(kind="scored", scored=ScoredConfig(score_function="sigmoid")),
    ]
    assert {c.kind for c in configs} == set(ROUTER_CLASSES)
    for config in configs:
        for k in (1, E):
            router = router_class(config.kind)(D, E, k, config)
            for training in (True, False):
                router.train(training)
                result = router(torch.randn(0, D))
                assert result.expert_ids_TK.shape[0] == 0
                assert float(result.aux_loss) == 0.0, (config.kind, k, training, float(result.aux_loss))
