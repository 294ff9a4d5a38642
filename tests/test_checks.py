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


def test_claim_graded_only_in_float32_and_unless_the_runner_says_not(monkeypatch):
    """The criteria were set on the built-in model in float32: in float16 / bfloat16 (a GPU's default), and
    where the course runner sets KVLAB_CLAIMS_STRICT=0 (--quick), a claim is recorded, not raised;
    strict=True still raises."""
    import kvlab
    for dtype in ("float16", "bfloat16"):
        model = kvlab.load(device="cpu", dtype=dtype).model
        assert checks.claim("t.g", "x", 0.0, (">", 1.0), model=model).verdict == "not reproduced"
        with pytest.raises(checks.ClaimNotReproduced):
            checks.claim("t.g", "x", 0.0, (">", 1.0), model=model, strict=True)
    model = kvlab.load(device="cpu").model
    monkeypatch.setenv("KVLAB_CLAIMS_STRICT", "0")
    assert checks.claim("t.h", "x", 0.0, (">", 1.0), model=model).verdict == "not reproduced"
    monkeypatch.setenv("KVLAB_CLAIMS_STRICT", "1")
    with pytest.raises(checks.ClaimNotReproduced):
        checks.claim("t.h", "x", 0.0, (">", 1.0), model=model)


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


def test_wilson_interval_matches_the_formula_and_stays_in_0_1():
    iv = checks.wilson(5, 40)
    assert iv.value == 0.125 and iv.n == 40
    assert iv.lo == pytest.approx(0.0546, abs=1e-3) and iv.hi == pytest.approx(0.2610, abs=1e-3)
    assert checks.wilson(0, 20).lo == 0.0 and checks.wilson(0, 20).hi > 0.1      # not [0, 0] at zero successes
    assert checks.wilson(20, 20).hi == 1.0 and checks.wilson(20, 20).lo < 0.9
    assert checks.wilson(50, 400).hi - checks.wilson(50, 400).lo < iv.hi - iv.lo  # more items, narrower
    with pytest.raises(ValueError, match="need n > 0"):
        checks.wilson(0, 0)
    with pytest.raises(ValueError, match="must lie in"):
        checks.wilson(5, 3)


def test_mean_ci_uses_students_t_and_bootstrap_covers_the_mean():
    iv = checks.mean_ci([0.6, 0.7, 0.65])
    assert iv.value == pytest.approx(0.65) and iv.hi - iv.value == pytest.approx(4.303 * 0.05 / 3 ** 0.5, rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        checks.mean_ci([0.5])
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(200, generator=g) + 3).tolist()
    b = checks.bootstrap(xs)
    assert b.lo < b.value < b.hi and b.lo < 3.0 < b.hi and b.hi - b.lo < 0.5
    assert checks.bootstrap(xs, seed=1) != b                               # the seed is used
    d = checks.diff_ci([1.0] * 30, [0.0] * 30)
    assert (d.value, d.lo, d.hi) == (1.0, 1.0, 1.0)


def test_trend_and_compare_write_what_the_numbers_say():
    s = checks.trend("value agreement", [0.126, 0.13, 0.08, 0.041], [2, 3, 4, 5])
    assert s == "Value agreement falls from 12.6% at layer 2 to 4.1% at layer 5 (peak 13.0% at layer 3)"
    assert "rises from 71.0% at layer 0 to 87.0% at layer 5" in checks.trend("drop", [0.71, 0.8, 0.87], [0, 3, 5])
    assert "stays at about" in checks.trend("x", [0.5, 0.51], flat=0.02)
    noisy = checks.trend("x", [checks.wilson(5, 40), checks.wilson(7, 40)], [0, 5])
    assert "no clear trend" in noisy and "n=40" in noisy
    with pytest.raises(ValueError, match="2 values but 3 positions"):
        checks.trend("x", [1, 2], [0, 1, 2])
    a, b = checks.mean_ci([0.6, 0.7, 0.65]), checks.mean_ci([0.5, 0.55, 0.52])
    assert "keys higher, but the intervals overlap" in checks.compare("acc", "keys", a, "values", b)
    assert checks.compare("S", "ROME", 0.9, "KN", 0.3).endswith("ROME higher")
    assert checks.compare("S", "ROME", 0.3, "KN", 0.9).endswith("KN higher")


def test_claim_with_interval_and_summary_from_recorded_claims(tmp_path, monkeypatch):
    path = tmp_path / "claims.jsonl"
    monkeypatch.setenv("KVLAB_CLAIMS", str(path))
    c = checks.claim("u.a", "most items agree", checks.wilson(30, 40), (">", 0.5), paper=0.65, source="a paper")
    assert c.ours == 0.75 and c.n == 40 and c.ci[0] < 0.75 < c.ci[1]
    row = json.loads(path.read_text().splitlines()[-1])
    assert row["ci"] == c.ci and row["n"] == 40
    checks.claim("u.b", "a difference", -0.1, (">", 0), ci=(-0.3, 0.1), n=3)
    with pytest.raises(ValueError, match="lo <= hi"):
        checks.claim("u.c", "x", 0.0, (">", 0), ci=(1, 0))
    md = checks.summary("u", ["agreement falls from 12.6% at layer 2 to 4.1% at layer 5"])
    text = md.data if hasattr(md, "data") else md
    assert "- agreement falls from 12.6%" in text and "1 of 2 reproduced" in text
    assert "`u.a` **reproduced**" in text and "`u.b` **not reproduced**" in text and "n=3" in text
    assert "t.a" not in text                                   # only this notebook's claims
    with pytest.raises(KeyError, match="no claim 'u.zzz'"):
        checks.get("u.zzz")


def test_paper_curves_map_onto_layers_with_citations():
    from kvlab import reference
    pts = reference.at_layers("geva.removal_last", 6, scale=100)
    assert pts == [(0.0, 67.5), (5.0, 20.0)]
    assert reference.at_layers("rome.hidden_aie_subject", 48)[0][0] == pytest.approx(15)
    assert reference.curve_label("geva.agreement") == "paper (Geva et al. 2021)"
    with pytest.raises(ValueError, match="no paper curve 'nope'"):
        reference.at_layers("nope", 6)
    iv = checks.bootstrap(list(range(10)), stat=lambda idx: sum(idx) / len(idx))   # any items with a stat
    assert iv.value == 4.5 and iv.lo < 4.5 < iv.hi


def test_ratio_ci_of_sums():
    num, den = torch.tensor([1.0, 2.0, 3.0, 4.0] * 10), torch.tensor([2.0, 4.0, 6.0, 8.0] * 10)
    iv = checks.ratio_ci(num, den)
    assert (iv.value, iv.lo, iv.hi, iv.n) == (0.5, 0.5, 0.5, 40)                    # every resample gives 1/2
    g = torch.Generator().manual_seed(0)
    den = torch.rand(200, generator=g) + 0.5
    iv = checks.ratio_ci(den * (0.3 + 0.1 * torch.randn(200, generator=g)), den)
    assert iv.lo < iv.value < iv.hi and iv.lo < 0.3 < iv.hi
    with pytest.raises(ValueError, match="equally long"):
        checks.ratio_ci([1.0], [1.0, 2.0])


def test_reference_table_agrees_with_the_single_numbers():
    from kvlab.reference import PAPER, TABLES
    rows, source = TABLES["rome.counterfact"]
    assert "Table 4" in source
    assert rows["ROME"] == (PAPER["rome.cf.s"][0], PAPER["rome.cf.es"][0], PAPER["rome.cf.ps"][0], PAPER["rome.cf.ns"][0])
    assert rows["KN"][0] == PAPER["rome.cf.kn_s"][0] and rows["FT"][3] == PAPER["rome.cf.ft_ns"][0]
    assert rows["unedited"][0] == PAPER["rome.cf.unedited"][0] and rows["unedited"][3] == PAPER["rome.cf.unedited_ns"][0]
