"""Diffusion and flow-matching policies for robot learning."""
__version__ = "0.1.0"
