"""turbollm.plan: the inference math (memory, latency, throughput, cost) and the SLO search.

Entry points: `cli.add_plan_parser` / `cli.run_plan` (the `turbollm plan` command),
`cost_model.estimate`, `recommend.recommend`, `validate.compare_with_engine`; see docs/plan.md.
"""
