"""Construction-time checks cached per model: a server or a loop that builds many decoders on the
same models pays each check (and what it builds) once."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager


def _fingerprint(model) -> tuple:
    """Changes when the model's weights are replaced, moved, cast or modified in place (weights made
    under torch.inference_mode keep no version counter: for those, in-place edits go unseen)."""
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
    return (impl, *((p.data_ptr(), None if p.is_inference() else p._version, p.dtype) for p in model.parameters()))


class ModelCheckCache:
    """Results of construction-time checks (and what they build), cached per model (weakly: they
    go with the model) and recomputed when the model's weights change (`_fingerprint`): building a
    decoder per request then repeats no check. A fingerprint is taken once per model per
    `stamp_window()` (one decoder construction), since it walks every parameter."""

    def __init__(self):
        self._results = weakref.WeakKeyDictionary()
        self._local = threading.local()

    @contextmanager
    def stamp_window(self):
        """Within it, each model's fingerprint is taken once (its weights do not change meanwhile)."""
        self._local.stamps = {}
        try:
            yield
        finally:
            self._local.stamps = None

    def _stamp(self, model) -> tuple:
        stamps = getattr(self._local, "stamps", None)
        if stamps is None:
            return _fingerprint(model)
        if id(model) not in stamps:
            stamps[id(model)] = _fingerprint(model)
        return stamps[id(model)]

    def get(self, model, key, compute, *others):
        per_model = self._results.setdefault(model, {})
        stamp = (self._stamp(model), *(id(o) for o in others), *(self._stamp(o) for o in others))
        hit = per_model.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute()
        per_model[key] = (stamp, value)
        return value

    def forget(self, model) -> None:
        """Drop `model`'s cached results (a change the fingerprint cannot see, e.g. patched code)."""
        self._results.pop(model, None)


CHECKS = ModelCheckCache()
