"""Optimisers (SGD, AdamW, LARS over tagged parameter groups) and their schedules, pure functions of the step:
what pretraining, the linear probe and the stages after pretraining share."""
