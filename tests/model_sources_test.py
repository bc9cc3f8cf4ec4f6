"""model_sources: image shapes without reading data, folder names, spec checks, loading splits."""
import os
import tempfile

from absl.testing import absltest
import ml_collections
import numpy as np

from configs import digits_latent_ot
from ddpm_ot_jax import model_sources


class ModelSourcesTest(absltest.TestCase):

  def test_image_shape_matches_the_loaded_split(self):
    """image_shape(config.data), computed without reading, is the shape load_split returns,
    restricted and transposed as the spec says."""
    config = digits_latent_ot.get_config()
    shape = model_sources.image_shape(config.data)
    split = model_sources.load_split(config.data, "train", classes=(3,), transform="transpose")
    self.assertEqual(tuple(split.image_shape), shape)
    self.assertEqual(set(split.labels.tolist()), {3})
    folder = ml_collections.ConfigDict(dict(name="image_folder", resolution=16, channels=3))
    self.assertEqual(model_sources.image_shape(folder), (16, 16, 3))

  def test_folder_name_says_what_the_model_is_trained_on(self):
    """folder_name: data, classes, transform, conditioning and seed; model_config shifts the
    seed and sets the number of classes."""
    config = digits_latent_ot.get_config()
    spec = model_sources.model_spec(classes=(0, 1, 2), transform="transpose", seed_offset=2)
    cfg = model_sources.model_config(config, spec)
    self.assertEqual(cfg.seed, config.seed + 2)
    self.assertEqual(model_sources.folder_name(cfg, spec),
                     f"digits-c012-transpose-seed{config.seed + 2}")
    cond = model_sources.model_spec(num_classes=10)
    self.assertEqual(model_sources.model_config(config, cond).model.num_classes, 10)
    self.assertEqual(model_sources.folder_name(model_sources.model_config(config, cond), cond),
                     "digits-cond10")
    self.assertNotEqual(model_sources.training_inputs(cfg, spec),
                        model_sources.training_inputs(model_sources.model_config(config, cond), cond))

  def test_bad_specs_and_missing_sources_are_clear_errors(self):
    """check_spec names the key; check_sources names a missing checkpoint folder."""
    with self.assertRaisesRegex(ValueError, "models.m.source"):
      model_sources.check_spec("m", model_sources.model_spec(source="web"))
    with self.assertRaisesRegex(ValueError, "needs models.m.path"):
      model_sources.check_spec("m", model_sources.model_spec(source="checkpoint"))
    config = digits_latent_ot.get_config()
    with tempfile.TemporaryDirectory() as tmp:
      missing = os.path.join(tmp, "nothing")
      config.models.own = model_sources.model_spec(source="checkpoint", path=missing)
      with self.assertRaisesRegex(FileNotFoundError, "model 'own'"):
        model_sources.check_sources(config, ["own"], (8, 8, 1))
    self.assertTrue(np.array_equal(model_sources.apply_transform(np.ones((1, 2, 2, 1)), "none"),
                                   np.ones((1, 2, 2, 1))))


if __name__ == "__main__":
  absltest.main()
