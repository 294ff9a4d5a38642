import pytest
import torch

import kvlab
from kvlab import checks, memory
from kvlab.arch import UnsupportedArchitecture, adapter, check_tokenizer
from kvlab.testing import FAMILIES, tiny

PROMPTS = ["anna berg lives in paris", "the king of france speaks french and"]


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny(request.param)


def test_adapter_shapes(loaded):
    model, tok, arch = loaded
    assert arch.n_layers == 3 and arch.d_model == 32 and arch.d_ff == 64
    for l in range(arch.n_layers):
        for K in arch.key_matrices(l):
            assert K.shape == (arch.d_ff, arch.d_model)
        assert arch.value_matrix(l).shape == (arch.d_ff, arch.d_model)
    assert len(arch.key_matrices(0)) == (2 if arch.family.gated else 1)
    assert arch.unembed.weight.shape[1] == arch.d_model
    assert arch.final_norm is not None


def test_check_layers(loaded):
    _, _, arch = loaded                       # 3 layers
    assert arch.check_layers() == [0, 1, 2]
    assert arch.check_layers(-1) == [2]
    assert arch.check_layers([2, 0, -1, 0]) == [0, 2]
    with pytest.raises(ValueError, match="no layers given"):
        arch.check_layers([])
    with pytest.raises(IndexError, match="out of range: the model has 3 layers"):
        arch.check_layers([0, 3])


def test_one_rule_for_layers():
    import numpy as np
    from kvlab.arch import LayerError, LayerOutOfRange, check_layers
    model, _, arch = tiny("gpt2")             # 3 layers
    assert arch.check_layers(np.int64(2)) == [2] == arch.check_layers(torch.tensor(2))
    assert arch.check_layers(np.array([0, -1])) == [0, 2] == arch.check_layers(torch.tensor([2, 0]))
    assert arch.check_layers(range(2)) == [0, 1] == check_layers(model, (1, 0))
    assert arch.check_layer(-3) == 0 and arch.check_layer(np.int32(1)) == 1
    for bad in ("12", "3", b"1"):
        with pytest.raises(LayerError, match="string"):
            arch.check_layers(bad)
    for bad in (True, np.bool_(False), torch.tensor(True), 2.5, "1", None, torch.tensor([1]), torch.tensor(1.0)):
        with pytest.raises(LayerError, match="a layer must be an int"):
            arch.check_layer(bad)
        with pytest.raises(LayerError, match="a layer must be an int"):
            arch.check_layers([0, bad])
        with pytest.raises(LayerError, match="a layer must be an int"):
            arch.mlp(bad)                     # every accessor goes through check_layer
    for bad in (True, 2.5, np.float64(1.0)):
        with pytest.raises(LayerError, match="a layer must be an int"):
            arch.check_layers(bad)
    for bad in (3, -4, [0, 7]):
        with pytest.raises(LayerOutOfRange, match=r"layer -?\d out of range: the model has 3 layers \(0\.\.2"):
            arch.check_layers(bad)
    assert issubclass(LayerOutOfRange, ValueError) and issubclass(LayerOutOfRange, IndexError)
    with pytest.raises(LayerError, match="no layers given"):
        arch.check_layers(iter(()))


def test_value_matrix_is_a_view(loaded):
    model, tok, arch = loaded
    V = arch.value_matrix(1)
    assert V.data_ptr() == arch.value_module(1).weight.data_ptr()
    K = arch.key_matrix(1)
    assert K.data_ptr() == arch.key_modules(1)[0].weight.data_ptr()


def test_memory_layers(loaded):
    model, tok, arch = loaded
    assert arch.memory_layers() == [0, 1, 2]
    mod = arch.value_module(1)
    saved = [p.detach().clone() for p in mod.parameters()]
    try:
        with torch.no_grad():
            for p in mod.parameters():
                p.zero_()
        assert arch.memory_layers() == [0, 2]          # an empty FFN stores no memories
        if mod.bias is not None:
            with torch.no_grad():
                mod.bias[0] = 1.0
            assert arch.memory_layers() == [0, 1, 2]   # a bias alone still writes
    finally:
        with torch.no_grad():
            for p, s in zip(mod.parameters(), saved):
                p.copy_(s)


def test_builtin_memory_layers():
    model, tok, arch = kvlab.load(device="cpu")
    assert arch.memory_layers() == list(range(1, arch.n_layers))   # layer 0's FFN is held at zero (model card)


def test_decomposition_equals_module_output(loaded):
    model, tok, arch = loaded
    for l in range(arch.n_layers):
        d = memory.decompose(model, tok, PROMPTS, l)
        assert d.m.shape == (2, d.batch.input_ids.shape[1], arch.d_ff)
        # Σ m_i v_i + b summed in another order than the module's kernel: 64 ulps of the size of the sum,
        # Σ |m_i v_i| + |b| (d_ff terms), in the model's dtype (kvlab.checks.tolerance)
        size = d.m.abs() @ d.values.abs() + d.bias.abs()                 # (batch, seq, d_model)
        tol = checks.tolerance(model, scale=size)
        torch.testing.assert_close(d.reconstruct(), d.output, atol=tol, rtol=0)
        # Sum of the sub-updates at one position is the same thing, value by value.
        su = d.sub_updates(0)
        torch.testing.assert_close(su.sum(0) + d.bias, d.output[0, d.batch.last[0]], atol=tol, rtol=0)


def test_coefficients_from_keys_match_hooked(loaded):
    model, tok, arch = loaded
    d = memory.decompose(model, tok, PROMPTS, 2)
    m = memory.coefficients_from_keys(model, 2, d.ffn_input)
    torch.testing.assert_close(m, d.m, atol=1e-5, rtol=1e-4)


def test_coefficients_layers_and_padding(loaded):
    model, tok, arch = loaded
    ms = memory.coefficients(model, tok, PROMPTS)
    assert sorted(ms) == list(range(arch.n_layers))
    m0 = memory.coefficients(model, tok, PROMPTS, 0)
    n0 = len(tok(PROMPTS[0])["input_ids"])
    assert torch.all(m0[0, n0:] == 0)  # pad positions zeroed
    torch.testing.assert_close(m0, ms[0])


def test_names_for_lora(loaded):
    model, tok, arch = loaded
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    for n in arch.key_names() + arch.value_names() + arch.attention_names():
        assert n in names


def test_unsupported_architecture_names_supported():
    from transformers import BertConfig, BertForMaskedLM
    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture, match="gpt2.*llama"):
        adapter(model)


def test_model_without_lm_head_is_unsupported_with_a_hint():
    from transformers import AutoModel
    for family in ("gpt2", "llama"):
        model = tiny(family)[0]
        bare = AutoModel.from_config(model.config)       # GPT2Model / LlamaModel: no LM head
        with pytest.raises(UnsupportedArchitecture, match="without a language-model head.*AutoModelForCausalLM"):
            adapter(bare)


def test_tokenizer_mismatch():
    model, tok, _ = tiny("gpt2")
    big = tiny("gpt2")[1]
    big.add_tokens([f"extra{i}" for i in range(500)])
    n = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=f"mismatch: the tokenizer has {len(big)} tokens .* only {n} rows"):
        check_tokenizer(model, big)
    check_tokenizer(model, tok)
    with pytest.raises(ValueError, match="a model and its tokenizer, in that order"):
        check_tokenizer(tok, model)


def test_layer_out_of_range():
    _, _, arch = tiny("gpt2")
    with pytest.raises(IndexError, match="3 layers"):
        arch.mlp(5)


def test_load_failure_is_clear(tmp_path):
    with pytest.raises(OSError, match="could not load"):
        kvlab.load(str(tmp_path), device="cpu")  # a folder with no model in it


def test_memory_coefficients_one_rule_for_layers():
    import numpy as np
    from kvlab import memory
    from kvlab.arch import LayerError
    model, tok, arch = tiny("gpt2")
    one = memory.coefficients(model, tok, "the king", layers=1)
    assert torch.equal(memory.coefficients(model, tok, "the king", layers=np.int64(1)), one)
    assert torch.equal(memory.coefficients(model, tok, "the king", layers=[1])[1], one)
    for bad in ([], "12", True, 2.5):
        with pytest.raises(LayerError):
            memory.coefficients(model, tok, "the king", layers=bad)
