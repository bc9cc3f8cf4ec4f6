"""Test-set bits/dim of a CIFAR-10 DDPM through the probability-flow ODE (GPU/TPU).

python scripts/main.py --config=configs/cifar10_likelihood.py --config.data.root=/path/to/cifar10
python scripts/main.py --config=configs/cifar10_likelihood.py --config.data.root=/path/to/cifar10 \
    --config.training.init_from_diffusers=/path/to/ddpm-cifar10-32   # the published weights

Either trains configs/cifar10_ddpm.py's model into <workdir>/model-<fingerprint>/ (800k steps,
resumable: a day-scale job) or, with training.init_from_diffusers, evaluates the imported
google/ddpm-cifar10-32 network as it is (its architecture from its config.json; config.model
and the training schedule are then not used; config.diffusion is its schedule). The 10,000 test
images are dequantized as score_sde does, y = 2(k + u)/256 − 1, and evaluated in batches split
across all devices with a Hutchinson divergence (one Rademacher probe, score_sde's choice),
Tsit5 at rtol = atol = 1e-5; bits/dim = −log₂ p(y)/3072 + 7. One progress line per batch; each
finished batch is kept, so a rerun in the same workdir resumes.
"""
import ml_collections

from configs import cifar10_ddpm


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_ddpm.network_config()
  config.experiment = "likelihood"
  config.likelihood = ml_collections.ConfigDict(dict(
      split="test",
      max_images=0,  # 0: all 10,000
      batch_size=500,  # images per solve, split across the devices
      divergence="hutchinson",
      probe="rademacher",
      num_probes=1,
      solver=ml_collections.ConfigDict(dict(solver="tsit5", rtol=1e-5, atol=1e-5,
                                            max_steps=4096)),
  ))
  return config
