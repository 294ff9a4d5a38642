"""Solutions to the exercises of notebook 05 (see notebooks/solutions/01.py)."""

# %% exercise 05.1
import torch
import kvlab


def restored_prob(model, tok, prompt, subject, answer_id, noise, eps, token, layer):
    """p(answer), mean over the noise samples, with the subject corrupted and block `layer`'s output at
    `token` restored to its clean value."""
    arch = kvlab.adapter(model)
    batch = kvlab.text.encode(model, tok, prompt)
    b, e = kvlab.text.subject_token_range(tok, prompt, subject)
    with torch.no_grad(), kvlab.hooks.capture(model, {"h": arch.layer(layer)}) as clean:
        model(**batch.inputs())                                          # clean run: keep block `layer`'s output
    samples = eps.shape[0]

    def corrupt(x):                                                      # (samples, n, d) token embeddings
        x = x.clone()
        x[:, b:e] += noise * eps.to(x.device, x.dtype)
        return x

    def restore(h):                                                      # (samples, n, d) output of block `layer`
        h = h.clone()
        h[:, token] = clean["h"][0, token]
        return h

    with torch.no_grad(), kvlab.hooks.patch(arch.embed, corrupt), kvlab.hooks.patch(arch.layer(layer), restore):
        logits = model(input_ids=batch.input_ids.repeat(samples, 1)).logits[:, -1]   # (samples, vocab)
    return float(logits.float().softmax(-1)[:, answer_id].mean())
