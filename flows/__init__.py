"""Prefect flows that chain the DVC stages: `retrain` and the SURD data-change check.

`flows.retrain.retrain` runs every stage through DVC, registers the result and promotes it by
policy; `flows.data_check.data_check` starts it when the SURD source changed; `flows.deploy`
puts both on schedules (`sur deploy`). See flows/README.md.
"""
