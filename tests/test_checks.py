"""Identities (asserted with a dtype-derived tolerance) and claims (recorded, strict on the built-in model)."""
import json

import pytest
import torch

from kvlab import checks
from kvlab.testing import tiny


def test_tolerance_follows_dtype_and_scale():
    t32, t16, tb16 = (checks.tolerance(d) for d in (torch.float32, torch.float16, torch.bfloat16))
    assert t32 < 1e-5 < t16 < tb16
    assert checks.tolerance(torch.float32, scale=100.0) == pytest.approx(100 * t32)
    assert checks.tolerance(torch.ones(3, dtype=torch.float16)) == t16
    model = tiny("gpt2").model
    assert checks.tolerance(model) == t32 and checks.tolerance(model.half()) == t16


def test_fp16_sum_error_within_tolerance_fp32_error_tiny():
    """What the tolerance is for: Σ m_i v_i in float16 is off by far more than float32's tolerance, but within
    float16's."""
    g = torch.Generator().manual_seed(0)
    m, V = torch.randn(512, generator=g), torch.randn(512, 128, generator=g) * 0.1
    exact = (m.double() @ V.double())
    err16 = ((m.half() @ V.half()).double() - exact).abs().max()
    assert err16 > checks.tolerance(torch.float32, exact)
    assert err16 <= checks.tolerance(torch.float16, exact)


def test_identity_raises_with_numbers():
    assert checks.identity("x", torch.tensor([1e-7, -2e-7]), 1e-6) == pytest.approx(2e-7)
    with pytest.raises(checks.IdentityError, match="identity 'x' fails: error 0.01 > tolerance 1e-06"):
        checks.identity("x", 0.01, 1e-6)
    with pytest.raises(checks.IdentityError):
        checks.identity("nan", float("nan"), 1.0)
    assert checks.identity("no rows", torch.zeros(0, 6), 0.0) == 0.0      # e.g. no token before the subject


def test_claim_verdicts_and_strictness(tmp_path, monkeypatch):
    path = tmp_path / "claims.jsonl"
    monkeypatch.setenv("KVLAB_CLAIMS", str(path))
    c = checks.claim("t.a", "big effect", 0.3, (">", 0.2), paper=0.186, source="ROME Fig. 1")
    assert c.verdict == "reproduced" and c.expect == "> 0.2" and c.model == "?"
    c = checks.claim("t.b", "big effect", 0.15, (">", 0.2), partly=(">", 0.1))
    assert c.verdict == "partly reproduced"
    c = checks.claim("t.c", "big effect", 0.05, (">", 0.2), partly=(">", 0.1))
    assert c.verdict == "not reproduced"           # not strict without a model: reported, no error
    with pytest.raises(checks.ClaimNotReproduced, match="t.d.*measured 0.05"):
        checks.claim("t.d", "big effect", 0.05, (">", 0.2), strict=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["t.a", "t.b", "t.c", "t.d"]
    assert rows[0]["paper"] == 0.186 and rows[2]["verdict"] == "not reproduced"
    assert [c.key for c in checks.recorded()][-4:] == ["t.a", "t.b", "t.c", "t.d"]


def test_claim_strict_on_builtin_model_only():
    import kvlab
    model, tok, arch = kvlab.load()
    with pytest.raises(checks.ClaimNotReproduced):
        checks.claim("t.e", "x", 0.0, (">", 1.0), model=model)
    small = tiny("gpt2").model
    assert checks.claim("t.f", "x", 0.0, (">", 1.0), model=small).verdict == "not reproduced"


def test_claim_rejects_bad_input():
    with pytest.raises(ValueError, match="expect must be"):
        checks.claim("t.g", "x", 1.0, ("~", 1.0))
    with pytest.raises(ValueError, match="measured value is nan"):
        checks.claim("t.h", "x", float("nan"), (">", 1.0))


def test_claim_reads_the_paper_reference():
    from kvlab.reference import PAPER
    c = checks.claim("t.r", "ATE", 0.3, (">", 0.1), ref="rome.ate")
    assert (c.paper, c.source) == PAPER["rome.ate"] and "ROME" in c.source
    with pytest.raises(ValueError, match="no paper reference 'rome.nope'"):
        checks.claim("t.s", "ATE", 0.3, (">", 0.1), ref="rome.nope")
