"""Reading and writing other libraries' checkpoints (diffusers folders, original Stable Diffusion
files) as difflab processes, predictions, networks and pipelines."""

from difflab.interop.schedulers import SchedulerConversion, scheduler_from_diffusers

__all__ = ["SchedulerConversion", "scheduler_from_diffusers"]
