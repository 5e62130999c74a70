"""Every training-config key given a wrong type, a negative and a zero, generated from the schema,
so a new key is covered automatically; plus the audit's cases by name."""

import math

import pytest

from difflab.training import config as train_config
from difflab.training.config import ConfigError

SCHEMA = train_config.schema()
WRONG = {int: "'abc'", float: "'fast'", bool: "'yes'", str: "5", list: "3"}


def _cases():
    for key, (kind, rule) in SCHEMA.items():
        yield key, WRONG[kind], False
        if kind in (int, float):
            for value in (-1, 0):
                yield key, str(value), rule is None or rule.allows(value)
        if rule is not None and rule.choices is not None:
            yield key, "'mystery'", False


CASES = list(_cases())


@pytest.mark.parametrize(("key", "text", "accepted"), CASES, ids=[f"{k}={t}" for k, t, _ in CASES])
def test_every_key_is_checked_where_it_enters(key, text, accepted):
    if accepted:
        train_config.load(None, [f"{key}={text}"])
        return
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be .*got .*from --set {key}="):
        train_config.load(None, [f"{key}={text}"])


@pytest.mark.parametrize("item", ["train.steps=0", "train.steps=-3", "data.batch_size=-1", "data.batch_size=0",
                                  "optim.accumulate=0", "train.keep_last=-1", "train.checkpoint_every=0",
                                  "train.log_every=0", "train.steps=abc", "optim.lr=fast", "optim.lr=nan",
                                  "ema.decay=1.0", "loss.cond_dropout=1.5"])
def test_the_audits_silent_or_crashing_values_are_refused(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be"):
        train_config.load(None, [item])


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text("[train]\nsteps = 0\n")
    with pytest.raises(ConfigError, match=r"train\.steps must be >= 1, got 0 \(in .*recipe\.toml\)"):
        train_config.load(path)


def test_the_schema_covers_every_non_open_key():
    assert "train.steps" in SCHEMA and "optim.lr" in SCHEMA and "loss.weighting" in SCHEMA
    assert len(CASES) >= 3 * sum(kind in (int, float) for kind, _ in SCHEMA.values())
    assert all(not math.isnan(r.low) for _, r in SCHEMA.values() if r is not None and r.low is not None)
