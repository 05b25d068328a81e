"""Settings of conditional models: config.sampling.labels as a list, an int or a string; the
labeled-dataset check only where a mode reads labels; the warning when guidance would use an
untrained null label."""

import pytest
from absl import logging

from conftest import tiny_config
from ddpm_jax import labels as labels_lib
from ddpm_jax import sampling
from ddpm_jax import train
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError

K = 10


def cond_config(**overrides):
  return tiny_config(**{"model__num_classes": K, "training__label_dropout": 0.1, **overrides})


@pytest.mark.parametrize(
  "spec, expected",
  [([1, 7, 7], [1, 7, 7]), ((3,), [3]), (3, [3]), ("1,7,7", [1, 7, 7]), ("all", list(range(K)))],
)
def test_labels_may_be_a_list_an_int_or_a_string(spec, expected):
  config = cond_config()
  config.sampling.labels = spec  # a list in a config file, an int or tuple from the command line
  validation.validate(config, mode="sample")
  assert sampling.config_label_table(config).tolist() == expected
  assert sampling.record(config)["labels"] == labels_lib.describe(spec)
  assert labels_lib.describe(spec) == ("all" if spec == "all" else "-".join(map(str, expected)))


def test_bad_labels_are_one_sentence():
  config = cond_config()
  for spec, words in [
    ([1, 10], "holds class 10"),
    ("seven", "must be 'all', 'grid'"),
    (True, "must be 'all', 'grid'"),
  ]:
    config.sampling.labels = spec
    with pytest.raises(ConfigError, match=words):
      validation.validate(config, mode="sample")


def test_only_the_modes_that_read_labels_need_a_labeled_dataset():
  config = cond_config(data__dataset="celeb_a_hq", data__image_size=8)
  for mode in ("train", "bpd"):
    with pytest.raises(ConfigError, match="needs class labels"):
      validation.validate(config, mode=mode)
  config.evaluation.watch_modes = ("bpd",)
  with pytest.raises(ConfigError, match="needs class labels"):
    validation.validate(config, mode="evaluate_watch")
  config.inpaint.mask, config.inpaint.jump_length = "center", 2
  for mode in ("sample", "inpaint"):  # an imported model samples whatever its data was
    validation.validate(config, mode=mode)


def test_guidance_without_label_dropout_is_warned(monkeypatch):
  said = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: said.append(msg % args))
  train.warn_if_null_label_untrained(cond_config())
  train.warn_if_null_label_untrained(tiny_config())
  assert said == []
  train.warn_if_null_label_untrained(cond_config(training__label_dropout=0.0))
  assert len(said) == 1 and "never trains the null label" in said[0]
