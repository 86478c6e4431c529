"""AttnLRP and CP-LRP as attribution methods of [inseq](https://github.com/inseq-team/inseq).

Importing this module registers two methods with inseq, ``"attnlrp"`` and ``"cp-lrp"``: inseq
finds its attribution methods as the subclasses of its ``FeatureAttribution`` that name a
``method_name``, and the two classes here are such subclasses. Install the extra with
``pip install "lrp-explicit[inseq]"``, then:

```python
import inseq
import lrp_explicit.integrations.inseq  # registers "attnlrp" and "cp-lrp"

model = inseq.load_model(llm, "attnlrp", tokenizer=tokenizer)
out = model.attribute("The capital of France is", generation_args={"max_new_tokens": 5})
out.show()
```

inseq generates, then attributes step by step; at each step the method explains the step's
target token from the prefix before it in one forward and one backward pass of
:func:`lrp_explicit.pipeline.attribute`, so the attribution of step ``i`` is exactly
``lrp_explicit.explain(llm, prefix_ids, target=token_id).relevance`` (the relevance of each
context token, summed over the hidden size), and also row ``i`` of
``lrp_explicit.explain(llm, prompt, generate=N).relevance``. The scores are per token
(inseq's *coarse* attributions: no further aggregation over an embedding dimension), so
inseq's aggregators, ``show()`` and ``save()`` / ``FeatureAttributionOutput.load()`` see the
relevance as it is.

What is explained at each step is inseq's *attributed function*. With these methods the
model's default becomes ``"logit"``, the LRP convention (the target token's logit, with its own
value as initial relevance); any other step function can be passed as ``attributed_fn=`` (for
example ``"contrast_logits_diff"`` with ``contrast_targets=``), and LRP then explains the
scalar that step function returns, computed under the composite's rules. Keyword arguments given
to ``inseq.load_model`` beyond inseq's own (``epsilon=``, ``attention="exact"`` …) go to the
composite (:func:`lrp_explicit.composites.get`).

inseq generates text, decodes it and tokenizes the text again to attribute it. With byte-level
tokenizers a generated token may not survive that (a token holding part of a character decodes
to ``�``, which tokenizes to other ids), and the steps would explain tokens the model never
generated. Once one of these methods is loaded on a model, the model's own generated ids are
kept: a text it generated (and decoded) is encoded as the ids that produced it, never
re-tokenized. For a batch of several prompts a generation whose ids do not survive decoding is
refused (attribute those prompts one at a time).

Decoder-only models (``…ForCausalLM``) are supported. inseq pads a batch of prompts on the left
and explains a step of all of them in one pass (no LRP rule mixes samples); the equality with
``explain`` is tested for one prompt and for a padded batch of two on a LLaMA, whose rotary
positions make the left padding invisible. A model whose positions the padding shifts gets
what inseq's other methods get for it.
"""
from __future__ import annotations

from typing import Any

try:
    from inseq.attr.feat.feature_attribution import FeatureAttribution
    from inseq.data import CoarseFeatureAttributionStepOutput
    from inseq.utils import Registry
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError("lrp_explicit.integrations.inseq needs inseq: "
                      'pip install "lrp-explicit[inseq]"') from err

from ..composites import Composite
from ..pipeline import Prepared, Target, attribute, embed, make_leaf, resolve_composite

__all__ = ["LRPAttribution", "AttnLRPAttribution", "CPLRPAttribution", "METHODS"]

#: The inseq method names this module registers, with the composite each one uses.
METHODS = {"attnlrp": "attnlrp", "cp-lrp": "cp-lrp"}


def _foreign_methods() -> set[str]:
    """Names of inseq attribution methods that are not this module's."""
    return {name for name, cls in FeatureAttribution.available_classes().items()
            if cls.__module__ != __name__}


_CLASH = sorted(_foreign_methods() & set(METHODS))
if _CLASH:
    raise ImportError(f"inseq already has attribution methods named {', '.join(_CLASH)}; "
                      "lrp_explicit cannot register its own under the same names")


class LRPAttribution(FeatureAttribution, Registry):
    """Explicit LRP of each generation step with an lrp_explicit composite (the base of the
    registered methods; inseq does not list it, as it lists none of its own bases).

    Parameters
    ----------
    attribution_model : inseq.models.AttributionModel
        The model inseq wraps (``inseq.load_model`` passes it).
    **options
        Options of the composite (``epsilon``, ``attention`` …), as for
        :func:`lrp_explicit.composites.get`.

    Attributes
    ----------
    composite : Composite
        The composite found for the wrapped model's family, reused at every step.

    Raises
    ------
    ValueError
        For an encoder-decoder model (not supported).
    lrp_explicit.errors.UnknownModelError
        If no family's composite fits the model.
    """

    #: The composite's registry name (set by the subclasses).
    composite_name = ""

    def __init__(self, attribution_model: Any, **options: Any) -> None:
        if attribution_model.is_encoder_decoder:
            raise ValueError(f"the {self.method_name} method of lrp_explicit explains decoder-only "
                             "models (…ForCausalLM); this one is an encoder-decoder")
        self.composite: Composite = resolve_composite(self.composite_name,
                                                      attribution_model.model, **options)
        self._previous_default: str | None = None
        super().__init__(attribution_model)

    def hook(self, **kwargs: Any) -> None:
        """Hook the method to its model: the model's default attributed function becomes
        ``"logit"`` (the composite is registered only during each step's pass)."""
        super().hook(**kwargs)
        model = self.attribution_model
        if model.default_attributed_fn_id != "logit":
            self._previous_default = model.default_attributed_fn_id
            # inseq 0.7 binds the public setter of the default to another name
            # (set_attributed_fn); the attribute behind the default_attributed_fn_id property:
            model._default_attributed_fn_id = "logit"
        _keep_generated_ids(model)

    def unhook(self, **kwargs: Any) -> None:
        """Unhook the method: the model's earlier default attributed function comes back."""
        super().unhook(**kwargs)
        model = self.attribution_model
        if self._previous_default is not None and model.default_attributed_fn_id == "logit":
            model._default_attributed_fn_id = self._previous_default
        self._previous_default = None

    def attribute_step(self, attribute_fn_main_args: dict[str, Any],
                       attribution_args: dict[str, Any] | None = None) -> Any:
        """Explain one generation step for every sequence of the batch.

        Parameters
        ----------
        attribute_fn_main_args : dict
            What inseq's decoder-only formatter builds for a step: ``additional_forward_args``
            holds the prefix ids, the target ids ``(batch, 1)``, the attributed function, the
            attention mask, whether embeddings are forwarded, and the names and values of the
            attributed function's extra arguments.
        attribution_args : dict, optional
            Method arguments; these methods take none (composite options go to
            ``inseq.load_model``).

        Returns
        -------
        inseq.data.CoarseFeatureAttributionStepOutput
            ``target_attributions`` of shape ``(batch, prefix length)``: the relevance of each
            prefix token, summed over the hidden size.

        Raises
        ------
        TypeError
            For attribution arguments.
        """
        if attribution_args:
            raise TypeError(f"the {self.method_name} method takes no attribution arguments "
                            f"(got {', '.join(sorted(attribution_args))}); pass composite "
                            "options such as epsilon= to inseq.load_model")
        (ids, target_ids, attributed_fn, attention_mask, _embeds, names,
         *values) = attribute_fn_main_args["additional_forward_args"]
        model = self.attribution_model
        leaf = make_leaf(embed(model.model, ids))
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        prepared = Prepared(leaves={"inputs_embeds": leaf}, kwargs=kwargs, ids=ids.cpu())
        extra = {k: v for k, v in zip(names, values) if v is not None}

        def target(output: Any) -> Target:
            # what inseq's own forward does with the model's output (AttributionModel._forward)
            batch = model.formatter.convert_args_to_batch(
                decoder_input_ids=ids, decoder_attention_mask=attention_mask,
                decoder_input_embeds=leaf)
            args = model.formatter.format_step_function_args(
                attribution_model=model, forward_output=output,
                target_ids=target_ids.squeeze(-1), is_attributed_fn=True, batch=batch)
            y = attributed_fn(args, **extra)
            return Target(y, y.detach())

        name = getattr(attributed_fn, "__name__", type(attributed_fn).__name__)
        result = attribute(model.model, prepared, target, self.composite,
                           label=f"<inseq {name}>")
        relevance = result.relevance["inputs_embeds"]
        if relevance is None:
            raise ValueError("no relevance reached the input embeddings of "
                             f"{type(model.model).__name__}")
        return CoarseFeatureAttributionStepOutput(
            source_attributions=None, target_attributions=relevance.sum(-1), step_scores={})


_KEPT = 256  # generated texts whose ids are remembered, per model


def _keep_generated_ids(model: Any) -> dict[str, Any]:
    """Make ``model`` (an inseq AttributionModel) encode the texts it generated as the ids it
    generated: its ``decode`` remembers the ids of each text it decodes, its ``encode`` gives
    them back for such a text (instance attributes, installed once per model and kept: inseq
    unhooks the method while it generates). Returns the map of text to ``(ids, exact)``."""
    import collections

    import torch
    from inseq.data import BatchEncoding

    produced = model.__dict__.get("_lrp_generated_ids")
    if produced is not None:
        return produced
    produced = collections.OrderedDict()
    decode, encode = model.decode, model.encode

    def decode_keeping_ids(ids: Any, skip_special_tokens: bool = True) -> Any:
        texts = decode(ids, skip_special_tokens=skip_special_tokens)
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if rows and isinstance(rows[0], int):
            rows = [rows]
        if isinstance(texts, list) and len(texts) == len(rows):
            special = set(model.tokenizer.all_special_ids)
            for text, row in zip(texts, rows):
                exact = len(rows) == 1 and not skip_special_tokens
                produced[text] = (list(row) if exact else [i for i in row if i not in special],
                                  exact)
                produced.move_to_end(text)
            while len(produced) > _KEPT:
                produced.popitem(last=False)
        return texts

    def encode_keeping_ids(texts: Any, as_targets: bool = False, return_baseline: bool = False,
                           include_eos_baseline: bool = False, **kwargs: Any) -> Any:
        batch = encode(texts, as_targets=as_targets, return_baseline=return_baseline,
                       include_eos_baseline=include_eos_baseline, **kwargs)
        listed = [texts] if isinstance(texts, str) else list(texts)
        if as_targets or not listed or not all(t in produced for t in listed):
            return batch
        special = set(model.tokenizer.all_special_ids)
        again = [[i for i, m in zip(row, mask) if m and i not in special]
                 for row, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist())]
        mine = [[i for i in produced[t][0] if i not in special] for t in listed]
        if again == mine:
            return batch  # the text gives the generated ids back: inseq's encoding is right
        if len(listed) > 1 or not produced[listed[0]][1]:
            raise ValueError("a generated token does not survive decoding and tokenizing "
                             "again (a byte-level token holding part of a character); "
                             "attribute one prompt at a time, so that the model's own ids "
                             "are kept")
        ids = produced[listed[0]][0]
        input_ids = torch.tensor([ids], device=batch.input_ids.device)
        baseline = None
        if return_baseline:  # inseq's baseline: unk everywhere, eos kept unless asked
            unk = model.tokenizer.unk_token_id
            baseline = torch.full_like(input_ids, unk if unk is not None else 0)
            if not include_eos_baseline and model.eos_token_id is not None:
                baseline = torch.where(input_ids == model.eos_token_id, input_ids, baseline)
        return BatchEncoding(
            input_ids=input_ids,
            input_tokens=[model._convert_ids_to_tokens(input_ids[0], skip_special_tokens=False)],
            attention_mask=torch.ones_like(input_ids), baseline_ids=baseline)

    model.decode = decode_keeping_ids
    model.encode = encode_keeping_ids
    model._lrp_generated_ids = produced
    return produced


class AttnLRPAttribution(LRPAttribution):
    """inseq method ``"attnlrp"``: AttnLRP (Achtibat et al., ICML 2024) with the composite of the
    model's family."""

    method_name = "attnlrp"
    composite_name = "attnlrp"


class CPLRPAttribution(LRPAttribution):
    """inseq method ``"cp-lrp"``: CP-LRP (Ali et al., ICML 2022; attention weights and gates held
    constant) with the composite of the model's family."""

    method_name = "cp-lrp"
    composite_name = "cp-lrp"
