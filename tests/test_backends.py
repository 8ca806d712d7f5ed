"""Backend selection and dispatch: set/context/env, unavailable backends, auto, torch.compile."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import sr3fast
from sr3fast import backends, ops, reference


@pytest.fixture(autouse=True)
def restore_selection():
    previous = sr3fast.get_backend()
    yield
    sr3fast.set_backend(previous)


def test_reference_is_always_available_and_selectable():
    sr3fast.set_backend("reference")
    assert sr3fast.get_backend() == "reference"
    assert backends.resolve("groupnorm_silu", "cpu") == "reference"
    assert backends.resolve("attention", "cuda") == "reference"


def test_context_manager_restores_the_previous_selection():
    sr3fast.set_backend("auto")
    with sr3fast.backend("reference"):
        assert sr3fast.get_backend() == "reference"
    assert sr3fast.get_backend() == "auto"
    with pytest.raises(RuntimeError):
        with sr3fast.backend("reference"):
            raise RuntimeError
    assert sr3fast.get_backend() == "auto"


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        sr3fast.set_backend("fastest")


def test_forcing_an_unavailable_backend_says_why():
    for name in ("cuda", "cpu", "triton"):
        reasons = [backends.unavailable_reason(name, device) for device in ("cpu", "cuda")]
        if all(reasons):
            with pytest.raises(backends.BackendUnavailable, match="not available"):
                sr3fast.set_backend(name)
    if not torch.cuda.is_available():
        assert "CUDA" in backends.unavailable_reason("triton", "cuda")


def test_a_selected_backend_that_cannot_run_on_a_device_raises_at_dispatch():
    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the compiled extension is not built")
    sr3fast.set_backend("cpu")
    with pytest.raises(backends.BackendUnavailable, match="cannot run"):
        backends.resolve("groupnorm_silu", "cuda")


def test_auto_explains_its_choice():
    text = sr3fast.explain_backend("cuda")
    for op in backends.OPS:
        assert op in text
    if not torch.cuda.is_available():
        assert "passed over" in text and "no CUDA device" in text


def test_environment_variable_sets_the_default():
    code = "import sr3fast; print(sr3fast.get_backend())"
    env = {**os.environ, "SR3FAST_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["SR3FAST_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "SR3FAST_BACKEND='nonsense'" in bad.stderr


def test_import_is_cheap_and_touches_no_gpu():
    code = ("import sys, sr3fast, torch; "
            "print(sorted(m for m in ('triton', 'sr3fast._C', 'sr3fast.model', 'sr3fast.api') "
            "if m in sys.modules), torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False"


def test_compiled_graph_dispatches_several_ops_on_its_first_trace():
    # Regression: the second op resolved inside one traced frame used to be missing from the
    # dispatch table dynamo had snapshotted.
    torch._dynamo.reset()
    x, w, b, shift = torch.randn(2, 8, 3, 5), torch.randn(8), torch.randn(8), torch.randn(2, 8)

    def block(x):
        h = ops.groupnorm_silu(x, 4, w, b, 1e-5, shift)
        q = h.flatten(2).transpose(1, 2)[:, None]               # (B, 1, L, C) view
        return ops.attention(q, q, q)

    with sr3fast.backend("reference"):
        compiled = torch.compile(block, fullgraph=True)
        h = reference.groupnorm_silu(x, 4, w, b, 1e-5, shift).flatten(2).transpose(1, 2)[:, None]
        torch.testing.assert_close(compiled(x), reference.attention(h, h, h), rtol=1e-5, atol=1e-5)


def test_a_built_extension_is_found_by_a_fresh_import():
    # Regression: probing sr3fast._C before torch was imported failed to find libc10.so, and auto
    # silently passed over a built extension.
    if importlib.util.find_spec("sr3fast._C") is None:
        pytest.skip("the compiled extension is not built")
    code = "import sr3fast; print(sr3fast.backends.unavailable_reason('cpu', 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
