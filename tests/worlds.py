"""The toy worlds at tiny sizes, for tests that need a world of their own."""

from __future__ import annotations


def build_tiny_grammar(monkeypatch, cache, *, n_train: int = 256, n_heldout: int = 24, teacher_steps: int = 6,
                       student_steps: int = 3, batch_size: int = 16):
    """The grammar world built at a tiny size (seconds; the real one trains for minutes) into
    ``cache`` (set as ``KDRAY_CACHE_DIR``, which subprocesses and their Ray processes inherit)."""
    import kdray.toy.grammar_world as gw
    from kdray import toy
    from kdray.toy.train import SFTRecipe

    monkeypatch.setattr(gw, "N_TRAIN", n_train)
    monkeypatch.setattr(gw, "N_HELDOUT", n_heldout)
    monkeypatch.setattr(gw, "FIT_PROMPTS", 4)
    monkeypatch.setattr(gw, "TEACHER_RECIPE", SFTRecipe(steps=teacher_steps, batch_size=batch_size, warmup=2))
    monkeypatch.setattr(gw, "STUDENT_RECIPE", SFTRecipe(steps=student_steps, batch_size=batch_size, warmup=1))
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(cache))
    for name in toy.BUILD_ID_ENVS.values():  # no pin of another build: a job resolves this one
        monkeypatch.delenv(name, raising=False)
    return toy.build_world("grammar")
