"""The fp32 island, the projection rule, and statistics buffers that stay float32.

docs/design.md's precision contract in one place:

- `fp32_island` runs a function with autocast disabled for *every* device type that has it on
  (CPU and CUDA alike, not CUDA only) and with its floating tensor arguments upcast to float32.
  The caller keeps the input's dtype and casts the result back (`restore_dtype` does it for
  tuples of results).
- `project` applies a projection (`nn.Linear`, ...): under autocast it follows autocast;
  without it the input is cast to the weight's dtype, so a bf16 input meeting an fp32 weight
  (or the reverse) can never raise "mat1 and mat2 must have the same dtype".
- `Fp32BuffersModule` keeps registered statistics buffers float32 under `.half()`,
  `.bfloat16()`, `.to(dtype)`; device moves still apply. A cast that goes around `.to()`
  (FSDP1 mixed precision's `buffer.data = ...`) is undone by `keep_fp32_buffers_`, which the
  layers call before they read or write their statistics.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

# device types torch may run autocast on; asked each call (autocast state is thread-local)
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # device type unknown to this build
        return False


def autocast_device_types(*tensors) -> list[str]:
    """Device types with autocast enabled now, plus those of the given tensors (deduplicated)."""
    types = [t for t in AUTOCAST_DEVICE_TYPES if _autocast_on(t)]
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.device.type not in types:
            if tensor.device.type in AUTOCAST_DEVICE_TYPES:
                types.append(tensor.device.type)
    return types


def _call_without_autocast(device_types, fn, args, kwargs):
    # nested `with` blocks rather than an ExitStack: torch.compile(fullgraph=True) traces these
    if not device_types:
        return fn(*args, **kwargs)
    with torch.autocast(device_types[0], enabled=False):
        return _call_without_autocast(device_types[1:], fn, args, kwargs)


def upcast(value):
    """Floating tensors -> float32 (fp64 too: nothing here computes in fp64); others unchanged."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def without_autocast(fn):
    """Decorator: `fn` runs with autocast off on every device type; dtypes are left alone.

    Also for plain tensor plumbing: `torch.cat` of bf16 tensors under fp16 autocast raises.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        types = autocast_device_types(*args, *kwargs.values())
        return _call_without_autocast(types, fn, args, kwargs)

    return run


# tensor plumbing on input-dtype tensors outside the islands
cat = without_autocast(torch.cat)
stack = without_autocast(torch.stack)


def fp32_island(fn):
    """Decorator: `fn` runs in float32 with autocast off on every device type.

    Floating tensor arguments arrive as float32; results are returned as computed (float32).
    """
    fn_without_autocast = without_autocast(fn)

    @functools.wraps(fn)
    def island(*args, **kwargs):
        args = tuple(upcast(a) for a in args)
        return fn_without_autocast(*args, **{k: upcast(v) for k, v in kwargs.items()})

    return island


def restore_dtype(value, dtype: torch.dtype):
    """Casts a floating tensor (or the floating tensors of a tuple/list) back to `dtype`."""
    if isinstance(value, (tuple, list)):
        return type(value)(restore_dtype(v, dtype) for v in value)
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def _weight_dtype(module: nn.Module):
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def projection_input(x: Tensor, weight_dtype: torch.dtype | None) -> Tensor:
    """The projection rule for an input: as it is under autocast (which casts it), else cast to
    the weight's dtype."""
    if weight_dtype is None or _autocast_on(x.device.type) or x.dtype == weight_dtype:
        return x
    return x.to(weight_dtype)


def project(module: nn.Module, x: Tensor) -> Tensor:
    """Applies a projection under the projection rule (see the module docstring)."""
    if isinstance(module, nn.Identity):
        return x
    return module(projection_input(x, _weight_dtype(module)))


def _keep_fp32_buffers_hook(module, args) -> None:
    module.keep_fp32_buffers_()  # a named function, not a lambda: modules stay picklable


class Fp32BuffersModule(nn.Module):
    """nn.Module whose buffers registered with `register_fp32_buffer` stay float32.

    `.half()` and friends go through `_apply`; for those buffers only the device part of the
    conversion is kept, from the untouched float32 original, so no statistic is ever rounded.
    """

    def register_fp32_buffer(self, name: str, tensor: Tensor, persistent: bool = True) -> None:
        # explicit float32: a default dtype of bf16 (HF `torch_dtype=`) must not leak in
        self.register_buffer(name, tensor.to(torch.float32), persistent=persistent)
        if "_fp32_buffer_names" not in self.__dict__:  # first one: check them before every call
            self.register_forward_pre_hook(_keep_fp32_buffers_hook)
        self.__dict__.setdefault("_fp32_buffer_names", set()).add(name)

    def fp32_buffer_names(self) -> set[str]:
        return set(self.__dict__.get("_fp32_buffer_names", ()))

    def keep_fp32_buffers_(self) -> None:
        """Undoes a cast that bypassed `_apply`: FSDP1's MixedPrecision(buffer_dtype=...) sets
        `buffer.data` directly. The buffer object stays the same (wrappers hold references to
        it); its values were rounded once, which the warning says."""
        for name in sorted(self.fp32_buffer_names()):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                warnings.warn(
                    f"{type(self).__name__}.{name}: a wrapper cast this statistics buffer to {buf.dtype} "
                    "(FSDP1's MixedPrecision(buffer_dtype=...) does); restored to float32, its values "
                    f"rounded once. Leave buffer_dtype=None or list {type(self).__name__} in "
                    "MixedPrecision(_module_classes_to_ignore=...)", stacklevel=2)
                buf.data = buf.data.to(torch.float32)

    def _apply(self, fn, recurse=True):
        originals = {
            name: self._buffers[name]
            for name in self.fp32_buffer_names()
            if self._buffers.get(name) is not None
        }
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != torch.float32:
                self._buffers[name] = original.to(device=moved.device)
        return self


def fp32_buffers(module: nn.Module):
    """Yields (qualified name, tensor) of every fp32 statistics buffer in `module`."""
    for prefix, sub in module.named_modules():
        if isinstance(sub, Fp32BuffersModule):
            for name in sorted(sub.fp32_buffer_names()):
                buf = sub._buffers.get(name)
                if buf is not None:
                    yield (f"{prefix}.{name}" if prefix else name), buf
