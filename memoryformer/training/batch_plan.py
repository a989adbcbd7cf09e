"""Batch arithmetic as litgpt and GPT-NeoX users set it, checked against the memory plan.

    global_batch_size = micro_batch_size x accumulate x devices x num_nodes

`micro_batch_size` (per device, per forward) is the knob and the accumulation is derived from it; a stated
`trainer.accumulate_grad_batches` is only checked. `micro_batch_size=auto` takes the largest micro-batch
that divides the device's share of the global batch and whose memory plan fits the device with
`memory_plan.AUTO_HEADROOM` left free. Every refusal is one sentence naming the key and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memoryformer.config import ConfigError
from memoryformer.training.memory_plan import AUTO_HEADROOM, GB, GIB, MemoryPlan, largest_fitting_micro_batch

AUTO = "auto"


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes of one device's memory (None: unknown) and where the number came from."""

    bytes: int | None
    source: str


def check_micro_batch_spec(value: Any) -> int | str | None:
    """`micro_batch_size` as None, "auto" or an int >= 1; anything else is refused in one sentence."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"micro_batch_size={value!r} must be an integer >= 1 or auto (the largest micro-batch the memory "
            f"plan fits into the device); set micro_batch_size=1 or more, or micro_batch_size=auto."
        )
    return value


def device_memory(
    device_memory_gb: float | None, trainer_cfg: dict[str, Any], processes_per_node: int
) -> DeviceMemory:
    """The memory of one device of the run.

    `device_memory_gb` (GB = 1e9 bytes) when given: plan for a device that is not here. Otherwise a CUDA
    device's total memory, or for `trainer.accelerator=cpu` the host's RAM shared by the node's processes.
    Under `trainer.accelerator=gpu` on a machine without CUDA it is unknown.
    """
    if device_memory_gb is not None:
        if not float(device_memory_gb) > 0:
            raise ConfigError(
                f"device_memory_gb={device_memory_gb} must be a positive number of GB (the memory of the "
                f"device to plan for, e.g. device_memory_gb=80) or null (this machine's device)."
            )
        return DeviceMemory(int(float(device_memory_gb) * GB), f"device_memory_gb={device_memory_gb:g}")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    import torch

    cuda = torch.cuda.is_available()
    if accelerator == "cpu" or (accelerator == "auto" and not cuda):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = f" / {processes_per_node} processes" if processes_per_node > 1 else ""
        return DeviceMemory(ram // max(1, processes_per_node), f"host RAM{share}")
    if not cuda:
        return DeviceMemory(None, "no CUDA device here")
    props = torch.cuda.get_device_properties(0)  # reads the device's properties; allocates nothing
    return DeviceMemory(int(props.total_memory), props.name)


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


def resolve_batch(
    spec: int | str | None,
    global_batch_size: int,
    world: int,
    stated_accumulate: int | None,
    memory: DeviceMemory,
    plan_for: Callable[[int, int], MemoryPlan],
) -> tuple[int, int]:
    """(micro_batch_size, accumulate) for `spec` (None, "auto" or an int), refused in one sentence when the
    batch does not divide, a stated accumulation disagrees, or the plan does not fit the device.

    `plan_for(micro, accumulate)` is the memory plan of a micro-batch.
    """
    gbs = global_batch_size
    if gbs <= 0 or gbs % world:
        raise ConfigError(
            f"global_batch_size={gbs} is not divisible by devices x num_nodes = {world}; pick a "
            f"global_batch_size that is a multiple of {world}."
        )
    share = gbs // world
    if spec is None:  # the device's whole share, or what a stated accumulation leaves of it
        accumulate = stated_accumulate or 1
        if share % accumulate:
            per_step = world * accumulate
            raise ConfigError(
                f"global_batch_size={gbs} is not divisible by devices x num_nodes x "
                f"trainer.accumulate_grad_batches = {world} x {accumulate} = {per_step}; "
                f"pick a global_batch_size that is a multiple of {per_step}."
            )
        micro = share // accumulate
    elif spec == AUTO:
        if memory.bytes is None:
            raise ConfigError(
                f"micro_batch_size=auto needs the device's memory, but there is {memory.source}; give "
                f"device_memory_gb=N (e.g. 80) to plan for the GPU the run will use, or a micro_batch_size."
            )
        fits = largest_fitting_micro_batch(
            _divisors(share), memory.bytes, AUTO_HEADROOM, lambda m: plan_for(m, share // m)
        )
        if fits is None:
            _refuse_plan(plan_for(1, share), memory, None, "micro_batch_size=auto")
        micro = fits
    else:
        micro = int(spec)
        if share % micro:
            per_step = micro * world
            raise ConfigError(
                f"global_batch_size={gbs} is not divisible by micro_batch_size x devices x num_nodes = "
                f"{micro} x {world} = {per_step}; pick a global_batch_size that is a multiple of {per_step}, "
                f"or a micro_batch_size that divides {share}."
            )
    accumulate = share // micro
    if stated_accumulate is not None and stated_accumulate != accumulate:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={stated_accumulate} disagrees with global_batch_size / "
            f"(micro_batch_size x devices x num_nodes) = {gbs} / ({micro} x {world}) = {accumulate}; remove "
            f"trainer.accumulate_grad_batches (the accumulation is derived) or set micro_batch_size="
            f"{share // stated_accumulate if share % stated_accumulate == 0 else 'N'}."
        )
    if memory.bytes is not None:
        plan = plan_for(micro, accumulate)
        if not plan.fits(memory.bytes):
            fits = largest_fitting_micro_batch(
                _divisors(share), memory.bytes, 0.0, lambda m: plan_for(m, share // m)
            )
            _refuse_plan(plan, memory, fits, f"micro_batch_size={micro}")
    return micro, accumulate


def _refuse_plan(plan: MemoryPlan, memory: DeviceMemory, fits: int | None, what: str) -> None:
    """Raise the one sentence for a plan larger than the device."""
    helps = (
        "activation_checkpointing=true, a ZeRO stage (trainer=deepspeed_zero2, deepspeed_zero3 or "
        "deepspeed_zero2_offload) or more devices (trainer.devices, trainer.num_nodes)"
    )
    device = f"{memory.bytes / GIB:.1f} GiB ({memory.source})"
    if fits is None:
        raise ConfigError(
            f"the memory plan needs {plan.memory_gib:.1f} GiB per device at {what} (even a micro-batch of "
            f"{plan.micro_batch_size} does not fit) but the device has {device}; use {helps}."
        )
    raise ConfigError(
        f"the memory plan needs {plan.memory_gib:.1f} GiB per device at {what} but the device has {device}; "
        f"set micro_batch_size={fits} (the largest that fits) or micro_batch_size=auto, or use {helps}."
    )
