import pytest
import torch

from kvlab import hooks
from kvlab.testing import tiny
from kvlab.text import encode, subject_token_range


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_and_patch_restore_on_exception():
    model, tok, arch = tiny("gpt2")
    batch = encode(model, tok, "anna berg lives in paris")
    clean = model(**batch.inputs()).logits
    with pytest.raises(RuntimeError):
        with hooks.patch(arch.mlp(1), lambda t: t * 0):
            with hooks.capture(model, {"b": arch.layer(0)}) as store:
                model(**batch.inputs())
                raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    assert store["b"].shape[-1] == arch.d_model
    torch.testing.assert_close(model(**batch.inputs()).logits, clean)


def test_patch_input_and_output_change_result():
    model, tok, arch = tiny("llama")
    batch = encode(model, tok, "anna berg lives in paris")
    clean = model(**batch.inputs()).logits
    with hooks.patch(arch.value_module(1), lambda m: torch.zeros_like(m), what="input"):
        zeroed = model(**batch.inputs()).logits
    with hooks.patch({arch.mlp(1): lambda o: o * 0}):
        zeroed_out = model(**batch.inputs()).logits
    assert not torch.allclose(clean, zeroed)
    # Zeroing m of a bias-free value projection == zeroing the FFN output.
    torch.testing.assert_close(zeroed, zeroed_out)
    assert _n_hooks(model) == 0


def test_subject_range_basic_and_errors():
    _, tok, _ = tiny("gpt2")
    assert subject_token_range(tok, "anna berg lives in paris", "anna berg") == (0, 2)
    assert subject_token_range(tok, "the king of france", "france") == (3, 4)
    s = "paris is in france and paris is"
    assert subject_token_range(tok, s, "paris", occurrence=-1) == (5, 6)
    with pytest.raises(ValueError, match="not found"):
        subject_token_range(tok, "anna berg lives in paris", "tom lee")


class _NoHooks(torch.nn.Module):
    """A module whose hook registration fails (as a bad entry would, after the first one registered)."""

    def register_forward_hook(self, *a, **kw):
        raise RuntimeError("no hooks here")

    register_forward_pre_hook = register_forward_hook


@pytest.mark.parametrize("bad", ["not a module", None, _NoHooks()])
def test_bad_second_entry_leaves_no_hook(bad):
    model, tok, arch = tiny("gpt2")
    batch = encode(model, tok, "anna berg lives in paris")
    clean = model(**batch.inputs()).logits
    calls = [
        lambda: hooks.capture(model, {"a": arch.layer(0), "b": bad}),
        lambda: hooks.capture(model, {"a": arch.layer(0), "b": bad}, what="input"),
        lambda: hooks.patch({arch.mlp(0): lambda t: t * 0, bad: lambda t: t * 0}),
        lambda: hooks.patch({arch.value_module(0): lambda t: t * 0, bad: lambda t: t}, what="input"),
    ]
    for call in calls:
        with pytest.raises((ValueError, RuntimeError), match="not an nn.Module|no hooks here"):
            with call():
                pass
        assert _n_hooks(model) == 0
    torch.testing.assert_close(model(**batch.inputs()).logits, clean, rtol=0, atol=0)


def test_bad_patch_function_or_what_leaves_no_hook():
    model, tok, arch = tiny("gpt2")
    with pytest.raises(ValueError, match="not callable"):
        with hooks.patch({arch.mlp(0): lambda t: t * 0, arch.mlp(1): "zero"}):
            pass
    for what in ("outputs", None):
        with pytest.raises(ValueError, match="what must be"):
            with hooks.patch({arch.mlp(0): lambda t: t * 0}, what=what):
                pass
        with pytest.raises(ValueError, match="what must be"):
            with hooks.capture(model, {"a": arch.mlp(0)}, what=what):
                pass
    with pytest.raises(ValueError, match="mapping"):
        with hooks.capture(model, [arch.mlp(0)]):
            pass
    assert _n_hooks(model) == 0
