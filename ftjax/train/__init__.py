"""Training: one module per algorithm (its loss, step and loop, `run`); the loop skeleton in
loop.py, config -> objects in setup.py, the reference policy in reference.py, the update step
and optimizer in common.py."""
