"""Expert placement: which expert lives on which rank, chosen from routing traces to cut all-to-all traffic.

Modules: ``inputs`` (traces / co-activation matrices -> per-layer `LayerRouting`), ``objective`` (copies per token,
KM1, cross-rank bytes, load imbalance), ``methods`` (balanced partitioners; `plan_layer`, `plan_placement`),
``plan`` (the versioned plan file; `load_plan`), ``evaluate`` (plan vs baselines), ``export`` (EPLB / AutoEP
formats), ``cli`` (``c2r-place``).
"""
