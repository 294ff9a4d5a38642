"""Solutions to the exercises of notebook 04 (see notebooks/solutions/01.py)."""

# %% exercise 04.1
import kvlab


def classify_update(model, tok, prompt, layer):
    """"keep", "override" or "compose": what the FFN of `layer` does to the top token at the last position."""
    rs = kvlab.lens.residual_stream(model, tok, [prompt], [layer])
    after, ffn = rs["block"][layer], rs["ffn"][layer]                    # (1, d_model) each
    before = after - ffn                                                 # the FFN is the last thing a block adds
    t_before, t_ffn, t_after = (int(kvlab.vocab.top_ids(model, v)[1][0, 0]) for v in (before, ffn, after))
    if t_after == t_before:
        return "keep"
    if t_after == t_ffn:
        return "override"
    return "compose"
