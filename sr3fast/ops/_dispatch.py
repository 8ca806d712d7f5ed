"""Looking up the implementation of an op in a way torch.compile traces without graph breaks."""
import torch

from .. import backends


class _Table:
    """Resolved implementations as attributes named '<backend>__<op>'. Attributes, not a dict:
    dynamo snapshots a dict the first time a traced frame reads it, so an entry added later in
    the same frame (the second op of a model, resolved mid-trace) would be missing; attributes
    are read when accessed."""


_TABLE = _Table()


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its cost: that function imports
    torch._dynamo (seconds) only to set this flag, and every model build would pay for it.
    tests/test_cli.py checks that torch still marks functions this way."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolved_name(op: str, device_type: str, selected: str) -> str:
    # Runs eagerly even while dynamo traces, so the import in _implementation_of happens here
    # and not in the graph. `selected` is read from the module global by the caller, which
    # guards compiled graphs on the selection: changing the backend recompiles.
    backend = backends._resolve(op, device_type, selected)[0]
    name = f"{backend}__{op}"
    if not hasattr(_TABLE, name):
        setattr(_TABLE, name, backends._implementation_of(backend, op))
    return name


def implementation(op: str, device: torch.device):
    """The function that runs `op` for tensors on `device` under the current selection."""
    return getattr(_TABLE, _resolved_name(op, device.type, backends._selected))
