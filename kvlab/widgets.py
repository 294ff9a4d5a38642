"""ipywidgets explorers for the notebooks.

Every explorer is a function ``explore_x(model, tok, ...) -> Explorer`` that the notebook
displays as its last expression. They compute with kvlab's functions and draw with
:mod:`kvlab.plots`; under papermill they render once with their default values.

An :class:`Explorer` is the widget plus a static rendering of that default view (HTML, figures
as PNG). Displayed, it emits two outputs: the live widget, and the static block, which is what
nbconvert's HTML (``build/course/``) and any viewer without a kernel or widget manager show. A
style rule in the static block hides it inside JupyterLab, where the live widget is there.
Modules add their explorers at the end of this file.
"""
from __future__ import annotations

import base64
import html
import io

import ipywidgets as W

STATIC_CLASS = "kvlab-static"
# Hidden inside JupyterLab's shell, where the live widget is drawn (tests/test_browser.py checks it); shown in
# exported HTML and other frontends. Lab drops <style> from untrusted outputs, so a notebook opened after
# papermill shows both.
_HIDE_IN_LAB = f"<style>.jp-LabShell .{STATIC_CLASS} {{display: none;}}</style>"


class Explorer(W.VBox):
    """An explorer: controls and output in a VBox, plus ``static_html``, its default view as HTML."""

    def __init__(self, children, static_html: str, **kwargs):
        super().__init__(children, **kwargs)
        self.static_html = static_html

    def static(self):
        """The static block alone (an ``IPython.display.HTML``)."""
        from IPython.display import HTML
        return HTML(f"<div class='{STATIC_CLASS}'>{_HIDE_IN_LAB}<p><em>Static view of this explorer's "
                    f"default setting (run the notebook to change it):</em></p>{self.static_html}</div>")

    def _ipython_display_(self):
        from IPython.display import display
        display(self._repr_mimebundle_(), raw=True)     # the live widget (widget-view + text/plain)
        display(self.static())


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=80)
    return buf.getvalue()


def _call(fn, values: dict) -> None:
    """``fn(**values)``; figures it leaves open (a non-inline backend such as Agg) are shown as PNG."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    before = set(plt.get_fignums())
    fn(**values)
    for n in plt.get_fignums():
        if n not in before:
            fig = plt.figure(n)
            display(Image(data=_png(fig), format="png"))
            plt.close(fig)


def _capture(fn, values: dict):
    """Run ``fn(**values)`` and return what it printed and displayed (``IPython.utils.capture.CapturedIO``)."""
    from IPython.utils.capture import capture_output

    with capture_output(stdout=True, stderr=False, display=True) as cap:
        _call(fn, values)
    return cap


def static_html(captured) -> str:
    """HTML of captured output: printed text, then each display as PNG, HTML, Markdown or plain text."""
    import mistune   # nbconvert's Markdown renderer (2.x and 3.x share this call)

    markdown = mistune.create_markdown(plugins=["table"])
    parts = [f"<pre>{html.escape(captured.stdout)}</pre>"] if captured.stdout.strip() else []
    for o in captured.outputs:
        data = o.data
        if "image/png" in data:
            png = data["image/png"]
            png = png if isinstance(png, str) else base64.b64encode(png).decode("ascii")
            parts.append(f"<img src='data:image/png;base64,{png}'/>")
        elif "text/html" in data:
            parts.append(data["text/html"])
        elif "text/markdown" in data:
            parts.append(markdown(data["text/markdown"]))
        elif "text/plain" in data:
            parts.append(f"<pre>{html.escape(data['text/plain'])}</pre>")
    return "\n".join(parts) or "<p>(the default setting shows nothing)</p>"


def interactive_output(fn, **controls) -> Explorer:
    """Controls in a row above the output of ``fn(**values)``; re-run on every change.

    The first run (the default values) is captured once: replayed into the output widget and kept
    as the explorer's static view. An error in it raises (a notebook run fails instead of showing
    an empty box); an error after a change is shown in the output.
    """
    out = W.Output()

    def values():
        return {name: w.value for name, w in controls.items()}

    def update(change=None):
        with out:                    # Output shows a traceback raised here and swallows it
            out.clear_output(wait=True)
            _call(fn, values())

    first = _capture(fn, values())
    with out:
        first.show()
    for w in controls.values():
        w.observe(update, "value")
    return Explorer([W.HBox(list(controls.values())), out], static_html(first))


def explore_lora(train_fn, roles, ranks, cache: dict | None = None) -> Explorer:
    """Pick a LoRA role and rank -> held-out accuracy per epoch and training loss per step.

    ``train_fn(role, rank)`` returns a :class:`kvlab.lora_train.History` (trained on demand);
    ``cache`` maps ``(role, rank)`` to histories already computed, so the default view (and a
    papermill run) trains nothing new. Other cached runs at the same rank are drawn dashed.
    """
    import matplotlib.pyplot as plt
    from . import plots

    cache = {} if cache is None else cache
    role_w = W.Dropdown(options=list(roles), description="role")
    rank_w = W.Dropdown(options=list(ranks), description="rank")

    def show(role, rank):
        if (role, rank) not in cache:
            cache[(role, rank)] = train_fn(role, rank)
        h = cache[(role, rank)]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
        others = {f"{r} (r={k})": c.eval_acc for (r, k), c in cache.items() if k == rank and r != role}
        plots.lines({f"{role} (r={rank})": h.eval_acc}, ax=a1, title="held-out accuracy",
                    xlabel="epoch", ylabel="exact match")
        for name, acc in others.items():
            a1.plot(range(len(acc)), acc, ls="--", alpha=0.6, label=name)
        a1.legend(fontsize=8)
        plots.lines({"loss": h.step_loss}, ax=a2, marker="", xlabel="step", ylabel="answer NLL",
                    title=f"{h.trainable:,} trainable parameters, {h.seconds:.1f} s")
        plt.show()

    return interactive_output(show, role=role_w, rank=rank_w)


def explore_memories(model, tok, index, n: int = 8, top: int = 8) -> Explorer:
    """Pick a mined layer and a key: its top trigger prefixes and the tokens its value promotes.

    ``index`` is a :class:`kvlab.triggers.TriggerIndex`; the value is read through final norm +
    unembedding (:func:`kvlab.vocab.value_tokens`).
    """
    import matplotlib.pyplot as plt
    from IPython.display import display, Markdown

    from . import plots
    from .vocab import value_tokens

    layer_w = W.Dropdown(options=list(index.layers), value=index.layers[-1], description="layer")
    key_w = W.BoundedIntText(value=0, min=0, max=index.values[index.layers[0]].shape[0] - 1, description="key")

    def show(layer, key):
        vt = value_tokens(model, tok, layer, [key], top)
        nxt = index.next_token(layer, key, 0)
        display(Markdown(f"**value v_{key} promotes:** " + ", ".join(f"`{t}`" for t in vt.tokens[0])
                         + f"  \n**token after the top trigger:** `{tok.decode([nxt]) if nxt is not None else '—'}`"))
        plots.trigger_bars(index, layer, key, n)
        plt.show()

    return interactive_output(show, layer=layer_w, key=key_w)


def explore_lens(model, tok, prompt: str) -> Explorer:
    """Type a prompt: per layer, the top token of the residual before the FFN, the FFN output, and after."""
    from IPython.display import display, Markdown

    from . import plots
    from .lens import residual_stream
    from .vocab import decode_ids, top_ids

    text_w = W.Text(value=prompt, description="prompt", layout=W.Layout(width="60%"))

    def show(prompt):
        if not prompt.strip():
            return
        rs = residual_stream(model, tok, [prompt])
        rows = []
        for l in sorted(rs["block"]):
            b, f = rs["block"][l], rs["ffn"][l]
            tb, tf, ta = (decode_ids(tok, top_ids(model, x)[1][:, 0])[0] for x in (b - f, f, b))
            verdict = "keep" if ta == tb else "override" if ta == tf else "compose"
            rows.append({"layer": l, "residual before FFN": repr(tb), "FFN output": repr(tf),
                         "residual after FFN": repr(ta), "FFN effect": verdict})
        final = tok.decode([int(rs["final"][0])])
        display(Markdown(plots.table(rows) + f"\n\nmodel's prediction: `{final}`"))

    return interactive_output(show, prompt=text_w)


def explore_editing(model, tok, editors: dict, prompt: str = "{} lives in", subject: str = "",
                    target: str = "", probes: str = "", k: int = 5) -> Explorer:
    """Type a subject and a new target, pick an editor, press *edit*: top-k predictions before/after.

    ``editors`` maps a name to ``fn(model, tok, EditRequest) -> WeightEdit`` (e.g.
    ``{"ROME": apply_rome, "FT-keys": ft_keys}``). ``probes``: extra prompts with "{}" for the
    subject (paraphrases, other relations), separated by "|". Every edit is undone afterwards.
    """
    import torch
    from .editing import EditRequest, same_weights, snapshot
    from .text import encode

    def topk(prompts):
        with torch.no_grad():
            b = encode(model, tok, prompts)
            p = model(**b.inputs()).logits[torch.arange(len(b)), b.last].softmax(-1)  # (n, vocab)
        top = p.topk(k)
        return [", ".join(f"{tok.decode([int(i)]).strip()} {float(v):.2f}" for v, i in zip(vs, ix))
                for vs, ix in zip(top.values, top.indices)]

    w_prompt = W.Text(value=prompt, description="prompt")
    w_subject = W.Text(value=subject, description="subject")
    w_target = W.Text(value=target, description="new target")
    w_probes = W.Text(value=probes, description="probes")
    w_method = W.Dropdown(options=list(editors), description="method")
    button = W.Button(description="edit", button_style="primary")
    out = W.Output()

    def report():
        try:
            req = EditRequest(w_prompt.value, w_subject.value.strip(), w_target.value.strip())
            prompts = [req.text] + [p.strip().replace("{}", req.subject) for p in w_probes.value.split("|")
                                    if p.strip()]
            before = topk(prompts)
            saved = snapshot(model)
            with editors[w_method.value](model, tok, req) as edit:
                after = topk(prompts)
            print(f"{edit}")
            for p, b, a in zip(prompts, before, after):
                print(f"{p!r}\n   before: {b}\n   after:  {a}")
            print("weights restored after undo:", same_weights(model, saved))
        except ValueError as e:
            print("ValueError:", e)

    def run(_=None):
        out.clear_output()
        with out:
            report()

    button.on_click(run)
    static = "<p>(no edit by default: type a subject and a new target, then press <em>edit</em>)</p>"
    if subject and target:
        first = _capture(report, {})
        with out:
            first.show()
        static = static_html(first)
    children = [W.HBox([w_prompt, w_subject]), W.HBox([w_target, w_method]), w_probes, button, out]
    return Explorer(children, static)


def explore_tracing(model, tok, facts, noise: float, samples: int = 10, window: int = 10) -> Explorer:
    """Pick a fact and a kind -> its causal-tracing heatmap (each fact traced once, then cached).

    ``facts``: known facts (``kvlab.data.KnownFact`` or (prompt, subject) pairs).
    """
    import matplotlib.pyplot as plt
    from . import plots, tracing

    pairs = [(f.prompt, f.subject) if hasattr(f, "prompt") else (f[0], f[1]) for f in facts]
    if not pairs:
        raise ValueError("explore_tracing: no facts given")
    cache: dict = {}
    w_fact = W.Dropdown(options=[(p, i) for i, (p, _) in enumerate(pairs)], value=0, description="fact")
    w_kind = W.ToggleButtons(options=list(tracing.KINDS), value="hidden", description="kind")

    def show(fact, kind):
        if fact not in cache:
            prompt, subject = pairs[fact]
            cache[fact] = tracing.trace_all_kinds(model, tok, prompt, subject, noise=noise, samples=samples,
                                                  window=window)
        plots.causal_trace(cache[fact][kind])
        plt.show()

    return interactive_output(show, fact=w_fact, kind=w_kind)


def explore_neurons(model, tok, facts: dict, cache: dict | None = None, steps: int = 20, t: float = 0.2,
                    p: float = 0.7) -> Explorer:
    """Pick a fact -> its mean attribution heatmap over its prompts, and its knowledge neurons.

    ``facts`` maps a label to ``(prompts, answer)``; ``cache`` maps labels to
    :class:`kvlab.neurons.KnowledgeNeurons` already found (the notebook's loop), so the
    default view computes nothing new. The table shows, per neuron, how many prompts had it
    in their coarse set and the relative change of p(answer) when it alone is suppressed.
    """
    import matplotlib.pyplot as plt
    import torch
    from IPython.display import Markdown, display

    from . import neurons as N
    from . import plots

    if not facts:
        raise ValueError("explore_neurons: no facts given")
    cache = {} if cache is None else cache
    w_fact = W.Dropdown(options=list(facts), description="fact", layout=W.Layout(width="60%"))

    def show(fact):
        prompts, answer = facts[fact]
        if fact not in cache:
            cache[fact] = N.find_knowledge_neurons(model, tok, prompts, answer, t=t, p=p, steps=steps)
        kn = cache[fact]
        mean = torch.stack([a.scores for a in kn.attributions]).mean(0)        # (n_layers, d_ff)
        plots.neuron_heatmap(mean, kn.neurons, title=f"{fact} → {answer}: mean attribution over "
                                                     f"{len(prompts)} prompts (circles: knowledge neurons)")
        plt.show()
        rows = []
        for x in kn.neurons:
            eff = N.intervention_effect(model, tok, [x], prompts, answer, 0.0).mean()
            rows.append({"layer": x[0], "neuron": x[1], "mean attribution": f"{float(mean[x]):.4f}",
                         "prompts sharing it": f"{kn.counts[x]}/{len(prompts)}",
                         "p(answer) when suppressed alone": f"{float(eff):+.1%}"})
        ps = N.answer_prob(model, tok, prompts, answer)
        display(Markdown(f"refined with p = {kn.p:.2f}; coarse sets per prompt: "
                         f"{[len(c) for c in kn.coarse]}; p(answer) per prompt: "
                         + ", ".join(f"{float(v):.2f}" for v in ps) + "\n\n" + plots.table(rows)))

    return interactive_output(show, fact=w_fact)
