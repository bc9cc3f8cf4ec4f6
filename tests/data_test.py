"""Tests of ddpm_ot_jax.data: loaders read tiny files written here in the real formats."""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from ddpm_ot_jax import data

import helpers


def _tempdir(test: absltest.TestCase) -> str:
  """A temporary folder removed after the test (works under pytest and absltest)."""
  return test.enterContext(tempfile.TemporaryDirectory())


def _rows(dataset: data.ImageDataset) -> list[bytes]:
  """Each (image, label) pair as bytes, to compare datasets as multisets."""
  flat = dataset.images.reshape(len(dataset), -1)
  return sorted(f.tobytes() + np.int32(y).tobytes() for f, y in zip(flat, dataset.labels))


def _indexed_dataset(n: int, height: int = 2, width: int = 3) -> data.ImageDataset:
  """Image i is filled with distinct values and has label i, so batches reveal indices."""
  images = np.arange(n * height * width, dtype=np.float32).reshape(n, height, width, 1)
  return data.ImageDataset(images / images.max(), np.arange(n, dtype=np.int32), n)


class DigitsTest(absltest.TestCase):

  def test_split_partitions_the_data(self):
    """train and heldout are disjoint, have sizes 1497 + 300, and together are 'all'."""
    train, heldout, everything = (data.load_digits(s) for s in ("train", "heldout", "all"))
    self.assertEqual((len(train), len(heldout), len(everything)), (1497, 300, 1797))
    self.assertEqual(sorted(_rows(train) + _rows(heldout)), _rows(everything))
    self.assertEmpty(set(_rows(train)) & set(_rows(heldout)))

  def test_split_is_stratified_and_fixed(self):
    """Each digit's heldout count is its share of 300 (±1), and the split never changes."""
    everything, heldout = data.load_digits("all"), data.load_digits("heldout")
    expected = np.bincount(everything.labels, minlength=10) * 300 / 1797
    self.assertLessEqual(np.abs(np.bincount(heldout.labels, minlength=10) - expected).max(), 1.0)
    again = data.load_digits("heldout")
    np.testing.assert_array_equal(again.images, heldout.images)
    np.testing.assert_array_equal(again.labels, heldout.labels)

  def test_pixel_scaling(self):
    """Pixels are v/8 − 1 for integers v in 0..16: on [−1, 1], both ends reached, shape 8×8×1."""
    digits = data.load_digits("all")
    self.assertEqual(digits.images.shape, (1797, 8, 8, 1))
    self.assertEqual((digits.images.min(), digits.images.max()), (-1.0, 1.0))
    levels = (digits.images + 1.0) * 8.0
    np.testing.assert_array_equal(levels, np.round(levels))
    self.assertEqual(digits.num_classes, 10)

  def test_unknown_split(self):
    """A misspelt split stops with a ValueError naming the valid ones."""
    with self.assertRaisesRegex(ValueError, "heldout"):
      data.load_digits("valid")


class Cifar10Test(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)

  def test_roundtrip(self):
    """Pixels read back equal x/127.5 − 1 of what was written, in HWC order, with labels."""
    written = helpers.fake_cifar(self.root)
    train = data.load_cifar10(self.root, "train")
    test = data.load_cifar10(self.root, "test")
    images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_allclose(train.images, images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(train.labels, labels)
    np.testing.assert_allclose(test.images, written["test_batch"][0] / 127.5 - 1.0, atol=1e-6)
    self.assertEqual((train.images.shape, test.images.shape), ((20, 32, 32, 3), (4, 32, 32, 3)))
    self.assertEqual(train.num_classes, 10)
    # The cifar-10-batches-py folder itself is accepted as root too.
    direct = data.load_cifar10(os.path.join(self.root, data.CIFAR10_FOLDER), "test")
    np.testing.assert_array_equal(direct.images, test.images)
    via_dispatch = data.load_dataset("cifar10", "heldout", self.root, None)
    np.testing.assert_array_equal(via_dispatch.images, test.images)

  def test_missing_folder_message(self):
    """No data: FileNotFoundError naming where it looked and how to get CIFAR-10."""
    with self.assertRaises(FileNotFoundError) as context:
      data.load_cifar10(self.root, "train")
    message = str(context.exception)
    self.assertIn(os.path.join(self.root, data.CIFAR10_FOLDER), message)
    self.assertIn(data.CIFAR10_URL, message)
    self.assertIn("download_cifar10", message)

  def test_missing_and_corrupt_batch(self):
    """A missing batch file is FileNotFoundError; a garbled one is ValueError naming it."""
    helpers.fake_cifar(self.root)
    folder = os.path.join(self.root, data.CIFAR10_FOLDER)
    os.remove(os.path.join(folder, "data_batch_3"))
    with self.assertRaisesRegex(FileNotFoundError, "data_batch_3"):
      data.load_cifar10(self.root, "train")
    with open(os.path.join(folder, "test_batch"), "wb") as f:
      f.write(b"not a pickle at all")
    with self.assertRaises(ValueError) as context:
      data.load_cifar10(self.root, "test")
    self.assertIn(os.path.join(folder, "test_batch"), str(context.exception))
    self.assertIn(data.CIFAR10_URL, str(context.exception))

  def test_extract_checks_md5(self):
    """extract_cifar10 rejects an archive with the wrong md5 and installs a right one."""
    source = _tempdir(self)
    helpers.fake_cifar(source)
    archive = os.path.join(source, "cifar-10-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
      tar.add(os.path.join(source, data.CIFAR10_FOLDER), arcname=data.CIFAR10_FOLDER)
    with self.assertRaisesRegex(ValueError, "md5"):
      data.extract_cifar10(archive, self.root, md5="0" * 32)
    self.assertFalse(os.path.exists(os.path.join(self.root, data.CIFAR10_FOLDER)))
    with open(archive, "rb") as f:
      md5 = hashlib.md5(f.read()).hexdigest()
    folder = data.extract_cifar10(archive, self.root, md5=md5)
    self.assertEqual(folder, os.path.join(self.root, data.CIFAR10_FOLDER))
    self.assertLen(data.load_cifar10(self.root, "train"), 20)


class ImageFolderTest(absltest.TestCase):

  def _save(self, path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)

  def test_classes_resize_and_crop(self):
    """Class = sorted subfolder; non-square images resize (shorter side) and crop centrally."""
    root = _tempdir(self)
    red, green = np.array([255, 0, 0], np.uint8), np.array([0, 255, 0], np.uint8)
    # 8 high, 24 wide: red | green | red thirds. At resolution 8 only the middle remains.
    stripes = np.zeros((8, 24, 3), np.uint8)
    stripes[:, :8], stripes[:, 8:16], stripes[:, 16:] = red, green, red
    self._save(os.path.join(root, "b_dog", "stripes.png"), stripes)
    # A constant 10×20 image shrinks to 8×16 and crops to 8×8: still constant.
    self._save(os.path.join(root, "a_cat", "one.png"), np.full((10, 20, 3), 77, np.uint8))
    self._save(os.path.join(root, "a_cat", "nested", "two.jpg"), np.full((16, 12, 3), 200, np.uint8))
    dataset = data.load_image_folder(root, 8)
    self.assertEqual(dataset.images.shape, (3, 8, 8, 3))
    self.assertEqual(dataset.class_names, ("a_cat", "b_dog"))
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1])
    # Within a class, files sort by relative path: nested/two.jpg before one.png.
    np.testing.assert_allclose(dataset.images[0], 200 / 127.5 - 1, atol=3 / 127.5)  # JPEG
    np.testing.assert_allclose(dataset.images[1], 77 / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(dataset.images[2], np.broadcast_to(green / 127.5 - 1, (8, 8, 3)),
                               atol=1e-6)

  def test_greyscale_single_class_and_splits(self):
    """Flat folders give one class; load_dataset picks root/<split> when it exists."""
    root = _tempdir(self)
    for split, value in (("train", 10), ("val", 250)):
      for i in range(2):
        self._save(os.path.join(root, split, f"{i}.png"), np.full((6, 6), value, np.uint8))
    grey = data.load_image_folder(os.path.join(root, "val"), 4, channels=1)
    self.assertEqual(grey.images.shape, (2, 4, 4, 1))
    self.assertEqual(grey.num_classes, 1)
    np.testing.assert_allclose(grey.images, 250 / 127.5 - 1, atol=1e-6)
    train = data.load_dataset("image_folder", "train", root, 4)
    self.assertEqual(train.images.shape, (2, 4, 4, 3))
    np.testing.assert_allclose(train.images, 10 / 127.5 - 1, atol=1e-6)
    with self.assertRaisesRegex(FileNotFoundError, "test"):
      data.load_dataset("image_folder", "test", root, 4)

  def test_errors(self):
    """Missing or empty folders: FileNotFoundError; an unreadable image: ValueError naming it."""
    root = _tempdir(self)
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      data.load_image_folder(os.path.join(root, "nothing"), 8)
    with self.assertRaisesRegex(FileNotFoundError, "No PNG/JPEG"):
      data.load_image_folder(root, 8)
    bad = os.path.join(root, "cls", "bad.png")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
      f.write(b"\x89PNG broken")
    with self.assertRaisesRegex(ValueError, "bad.png"):
      data.load_image_folder(root, 8)
    with self.assertRaisesRegex(ValueError, "Unknown dataset"):
      data.load_dataset("mnist", "train", root, 8)


class CheckDatasetTest(absltest.TestCase):

  def test_raises_what_the_loader_raises_without_reading_images(self):
    """check_dataset raises the loader's own error type and message for a missing CIFAR-10
    split, a missing or image-less folder, a bad split or resolution, and returns None for
    data that loads; a corrupt image is not read (the load then fails, the check does not)."""
    root = _tempdir(self)
    cases = [("cifar10", "train", root, None), ("image_folder", "train", root, 8),
             ("image_folder", "val", root, 8), ("digits", "validation", None, None),
             ("digits", "train", None, 16), ("mnist", "train", root, 8)]
    for case in cases:
      with self.assertRaises((FileNotFoundError, ValueError)) as loading:
        data.load_dataset(*case)
      with self.assertRaises(type(loading.exception)) as checking:
        data.check_dataset(*case)
      self.assertEqual(str(checking.exception), str(loading.exception), case)
    self.assertIsNone(data.check_dataset("digits", "heldout"))
    helpers.fake_cifar(root)
    self.assertIsNone(data.check_dataset("cifar10", "test", root))
    bad = os.path.join(root, "train", "cls", "bad.png")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
      f.write(b"\x89PNG broken")
    self.assertIsNone(data.check_dataset("image_folder", "train", root, 8))
    with self.assertRaisesRegex(ValueError, "bad.png"):
      data.load_dataset("image_folder", "train", root, 8)


class BatchIteratorTest(absltest.TestCase):

  def test_resume_equals_uninterrupted(self):
    """Batch k (images, labels, flips) is the same whether started at 0 or at start_step=k."""
    dataset = _indexed_dataset(13)
    full = data.batch_iterator(dataset, 5, seed=7, flip=True)
    batches = [next(full) for _ in range(9)]
    for k in (0, 3, 8):
      resumed = next(data.batch_iterator(dataset, 5, seed=7, start_step=k, flip=True))
      np.testing.assert_array_equal(resumed[0], batches[k][0])
      np.testing.assert_array_equal(resumed[1], batches[k][1])
      direct = data.get_batch(dataset, 5, seed=7, step=k, flip=True)
      np.testing.assert_array_equal(direct[0], batches[k][0])

  def test_each_epoch_is_a_permutation(self):
    """The concatenated batches visit every example once per epoch, in a new order each epoch."""
    for batch_size in (4, 25):  # batches straddle epochs; also B > N
      iterator = data.batch_iterator(_indexed_dataset(10), batch_size, seed=3)
      stream = np.concatenate([next(iterator)[1] for _ in range(100 // batch_size)])
      epochs = stream.reshape(-1, 10)
      for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
      self.assertGreater(len({tuple(e) for e in epochs}), 1)
    first = next(data.batch_iterator(_indexed_dataset(10), 10, seed=4))[1]
    self.assertFalse(np.array_equal(first, stream[:10]))  # another seed, another order

  def test_flip_mirrors_images(self):
    """flip=True mirrors some images left-right exactly and leaves the others untouched."""
    dataset = _indexed_dataset(64, height=3, width=4)
    images, labels = data.get_batch(dataset, 64, seed=1, step=0, flip=True)
    original = dataset.images[labels]
    mirrored = np.array([np.array_equal(a, b[:, ::-1]) for a, b in zip(images, original)])
    unchanged = np.array([np.array_equal(a, b) for a, b in zip(images, original)])
    np.testing.assert_array_equal(mirrored | unchanged, True)
    self.assertBetween(mirrored.mean(), 0.2, 0.8)
    plain, _ = data.get_batch(dataset, 64, seed=1, step=0)
    np.testing.assert_array_equal(plain, original)

  def test_host_shards_tile_the_global_batch(self):
    """The num_shards slices of a batch, concatenated, are the global batch."""
    dataset = _indexed_dataset(11)
    global_batch = data.get_batch(dataset, 8, seed=2, step=5, flip=True)
    parts = [next(data.batch_iterator(dataset, 8, seed=2, start_step=5, flip=True,
                                      num_shards=4, shard_index=i)) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), global_batch[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), global_batch[1])
    with self.assertRaisesRegex(ValueError, "shards"):
      data.batch_iterator(dataset, 6, seed=0, num_shards=4)

  def test_shard_batch(self):
    """shard_batch reshapes (B, ...) to (D, B/D, ...) row-major, for a tuple of arrays."""
    images, labels = np.arange(24.0).reshape(6, 2, 2), np.arange(6)
    sharded_images, sharded_labels = data.shard_batch((images, labels), 3)
    self.assertEqual(sharded_images.shape, (3, 2, 2, 2))
    np.testing.assert_array_equal(sharded_labels, [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(sharded_images[1, 0], images[2])
    with self.assertRaisesRegex(ValueError, "not divisible by 4"):
      data.shard_batch(images, 4)


if __name__ == "__main__":
  absltest.main()


class SplitSliceTest(absltest.TestCase):

  def test_slices_are_disjoint_near_stratified_and_cover_the_split(self):
    """'train[:897]', 'train[897:1197]' and 'train[1197:]' (the DPM-OT roles: targets,
    classifier, floor) share no image, together are the whole train split, hold every class
    within one image of its share, and are the same on every call (a fixed order)."""
    full = data.load_dataset("digits", "train")
    parts = [data.load_dataset("digits", s) for s in
             ("train[:897]", "train[897:1197]", "train[1197:]")]
    self.assertEqual([len(p) for p in parts], [897, 300, 300])
    rows = [{img.tobytes() for img in p.images} for p in parts]
    self.assertEqual(sum(len(r) for r in rows), len({img.tobytes() for img in full.images}))
    self.assertFalse(rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    shares = np.bincount(full.labels, minlength=10) / len(full)
    for part in parts:
      counts = np.bincount(part.labels, minlength=10)
      np.testing.assert_array_less(np.abs(counts - shares * len(part)), 1.0 + 1e-9)
    again = data.load_dataset("digits", "train[897:1197]")
    np.testing.assert_array_equal(again.images, parts[1].images)

  def test_bad_slices_are_clear_errors(self):
    """A slice past the split's end, an empty slice or a malformed one: ValueError."""
    with self.assertRaisesRegex(ValueError, "1497 images"):
      data.load_dataset("digits", "train[:5000]")
    with self.assertRaisesRegex(ValueError, "slice looks like"):
      data.load_dataset("digits", "train[1:2:3]")
    with self.assertRaisesRegex(ValueError, "past the end"):
      data.load_dataset("digits", "train[10:10]")
