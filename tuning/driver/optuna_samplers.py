"""Optuna samplers that Tune can pickle with the experiment.

Optuna 5.1's genetic samplers (NSGA-II among them) keep a ``threading.Lock`` around their
generation cache and define no ``__getstate__``, so a Tuner holding one fails at its start with
"cannot pickle '_thread.lock' object" (Tune pickles the searcher with the experiment's state, and
again at every experiment checkpoint). ``NSGAIISampler`` here drops the lock when pickled and makes
a new one when unpickled; everything else (population, seed, RNG state, the generation cache) is
pickled as before. Optuna 5.0 has no such lock; there the class changes nothing but an unused attribute.
"""
from __future__ import annotations

import threading
from typing import Any

import optuna


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()   # unused by Optuna 5.0


# Optuna names the study attributes it keeps per generation after the sampler's class (set when a
# subclass is made): keep NSGA-II's own names, so a study reads the same as with Optuna's class.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if hasattr(optuna.samplers.NSGAIISampler, _key):
        setattr(NSGAIISampler, _key, getattr(optuna.samplers.NSGAIISampler, _key))
