"""Solutions to the exercises of notebook 02 (see notebooks/solutions/01.py)."""

# %% exercise 02.1
import torch
import kvlab


def top_triggers(model, tok, texts, layer, key, k=5):
    """The k prefixes (sentence, position, coefficient) with the largest m_key, best first."""
    batch = kvlab.text.encode(model, tok, texts)                          # right-padded: positions as in tok(text)
    m = kvlab.memory.coefficients(model, tok, texts, layer)[..., key]    # (n_texts, seq): every prefix at once
    special = torch.tensor(sorted(set(tok.all_special_ids)), device=batch.input_ids.device)
    valid = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)
    m = m.float().masked_fill(~valid, float("-inf"))                     # padding and special tokens never win
    values, flat = m.flatten().topk(k)
    seq = m.shape[1]
    return [(int(i) // seq, int(i) % seq, float(v)) for v, i in zip(values, flat)]
