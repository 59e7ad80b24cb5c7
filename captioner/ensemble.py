"""Ensembles: several decoders of one encoder as one `StepModel`, so beam search (and greedy
decoding and sampling) runs over their combined next-word distribution.

The combination is the mean of the members' probabilities (its log: logsumexp - log n), not
the mean of their log-probabilities. On Flickr8k dev, beam 3, the shipped model with its
cross-entropy parent: mean of probabilities BLEU-4 21.05, CIDEr 52.41; mean of log-probabilities
20.50, 50.88; the shipped model alone 20.72, 51.82 (docs/experiments.md, "Ensembles"). A word
one member rules out (log p = -inf, or nearly) keeps the others' mass instead of vetoing it.

The members may be of either runtime's steps and of both model types: when one attends, the
ensemble reads spatial maps [N, R, C] and gives the others their mean over the regions, which is
the encoder's pooled vector (to float16 rounding, when the maps come from the feature cache). The bundle that holds an ensemble is `captioner.bundle`'s.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from captioner.decoding import StepModel, attends, runtime_name
from captioner.familiarity import pooled


class EnsembleStep:
    """A `StepModel` over member `StepModel`s: states are the members' concatenated (beam search
    reorders them as any state), the context is the members' contexts with where each member's
    states start, and the log-probabilities are the log of the mean of the members' probabilities.

    An attention member must come first: its attention weights are the ensemble's (so the
    index needs no shift), and its features are what the ensemble reads."""

    def __init__(self, members: Sequence[StepModel]):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        runtimes = {runtime_name(m) for m in members}
        if len(runtimes) > 1:
            raise ValueError(f"ensemble members must run on one runtime, got {', '.join(sorted(runtimes))}")
        if any(attends(m) for m in members[1:]) and not attends(members[0]):
            raise ValueError("an attention member must come first in an ensemble (its maps are the ensemble's)")
        self.members = list(members)
        self.runtime = runtimes.pop()
        #: which state holds the last step's attention weights: the first member's, if it attends
        self.attention_state: int | None = getattr(members[0], "attention_state", None)
        self._reads_grids = [attends(m) for m in members]

    def initial_state(self, features: np.ndarray) -> tuple[list[np.ndarray], Any]:
        features = np.asarray(features, np.float32)
        grids = any(self._reads_grids)
        vectors = pooled(features) if grids else features  # what the members without attention read
        states, contexts, bounds = [], [], [0]
        for member, reads_grids in zip(self.members, self._reads_grids):
            member_states, context = member.initial_state(features if reads_grids else vectors)
            states += member_states
            contexts.append(context)
            bounds.append(len(states))
        return states, (contexts, bounds)

    def step(self, tokens: np.ndarray, states: list[np.ndarray], context: Any,
             images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        contexts, bounds = context
        log_probs, new_states = [], []
        for i, member in enumerate(self.members):
            lp, member_states = member.step(tokens, states[bounds[i] : bounds[i + 1]], contexts[i], images)
            log_probs.append(lp)
            new_states += member_states
        return mean_probability(np.stack(log_probs)), new_states


def mean_probability(log_probs: np.ndarray) -> np.ndarray:
    """log(mean_i exp(log_probs[i])) over the first axis, stable; -inf where every member has
    -inf (the tokens no caption may contain stay impossible)."""
    top = log_probs.max(axis=0)
    shift = np.where(np.isfinite(top), top, 0.0).astype(log_probs.dtype)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the answer for a token every member bans
        return shift + np.log(np.exp(log_probs - shift).mean(axis=0))


def step_model_for(bundle, single: Callable[[Any], StepModel]) -> StepModel:
    """`single(bundle)` for a bundle of one decoder; for an ensemble bundle, an `EnsembleStep`
    over `single(member)` for each of its members."""
    if not bundle.members:
        return single(bundle)
    return EnsembleStep([single(member) for member in bundle.members])
