"""Looking up the implementation of an op in a way torch.compile traces without graph breaks."""
import torch

from .. import backends

# (backend name, op) -> function; filled on first resolution, read by traced code.
_IMPLEMENTATIONS: dict = {}


@torch.compiler.assume_constant_result
def _backend_name(op: str, device_type: str, selected: str) -> str:
    # Runs eagerly even while dynamo traces, so the import in _implementation_of happens here
    # and not in the graph. `selected` is read from the module global by the caller, which
    # guards compiled graphs on the selection: changing the backend recompiles.
    name = backends._resolve(op, device_type, selected)[0]
    if (name, op) not in _IMPLEMENTATIONS:
        _IMPLEMENTATIONS[name, op] = backends._implementation_of(name, op)
    return name


def implementation(op: str, device: torch.device):
    """The function that runs `op` for tensors on `device` under the current selection."""
    return _IMPLEMENTATIONS[_backend_name(op, device.type, backends._selected), op]
