"""plotting: the image-row and transport-plan figures draw what they are given."""
from absl.testing import absltest
import numpy as np

from ddpm_ot_jax import plotting


class PlottingTest(absltest.TestCase):

  def test_transport_plans_are_permutation_matrices(self):
    """Each panel shows the K × K plan of its π: one 1 per row and column, at (i, π(i))."""
    perm = np.array([2, 0, 1, 3])
    fig = plotting.transport_plans_figure([("a", np.arange(4), 1.0, 0.0), ("b", perm, 0.25, 0.1)])
    self.assertLen(fig.axes, 2)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), np.eye(4))
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), np.eye(4)[perm])
    self.assertIn("identity 0.250", fig.axes[1].get_title())

  def test_image_rows_show_each_row_as_its_grid(self):
    """One axis per row, holding `image_grid` of that row's images (clipped to [−1, 1])."""
    rng = np.random.default_rng(0)
    rows = [("x", rng.uniform(-2, 2, (3, 4, 4, 1))), ("y", rng.uniform(-1, 1, (3, 4, 4, 1)))]
    fig = plotting.image_rows_figure(rows, "title")
    self.assertLen(fig.axes, 2)
    for ax, (_, images) in zip(fig.axes, rows):
      expected = plotting.image_grid(np.clip(images, -1, 1), columns=3)[..., 0]
      np.testing.assert_allclose(ax.images[0].get_array(), expected)


if __name__ == "__main__":
  absltest.main()
