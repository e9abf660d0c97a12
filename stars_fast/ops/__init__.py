"""The fused ops: torch.library registrations, autograd and backend dispatch."""
