"""trainer.plan: peak memory per GPU and step time of a training config, before it queues, never allocating the
model (`python -m trainer.plan`, docs/plan.md). `model.py` counts the parameters on the meta device,
`activations.py` traces one forward and backward on fake tensors, `memory.py` adds the strategy's model
states (trainer/strategies/layout.py), `steptime.py` is the roofline, `devices.py` the device table with its
sources, `planner.py` the job and its alternatives, `report.py` the text.
"""
