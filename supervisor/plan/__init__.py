"""What a reload will do, decided once (pure): the plan of a config and of a
rollout, and the kernel capabilities it is decided on."""
