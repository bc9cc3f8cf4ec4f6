"""ddpm_ot_jax: is the DDPM encoder the optimal transport map? And DPM-OT, a fast sampler.

The pins below are one mutually compatible set, resolved and tested on Python 3.11
(jax >= 0.11 and flax >= 0.12.9 need Python >= 3.12). For a GPU or TPU, install the
matching jax build after this package, e.g. `pip install "jax[cuda12]==0.10.2"` or
`pip install "jax[tpu]==0.10.2"`.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "diffrax==0.7.2",
    "equinox==0.13.8",
    "optimistix==0.1.0",  # fokker_planck: the max-norm of its batched step control
    "ott-jax==0.6.0",
    "orbax-checkpoint==0.12.8",
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "POT==0.9.7.post1",
    "matplotlib==3.11.2",
    "scikit-learn==1.9.1",
    "threadpoolctl==3.8.0",  # fokker_planck pins BLAS to one thread for its many small products
    "pillow==13.0.0",
    "safetensors==0.8.0",
]

EXTRAS = {
    # torch (CPU build) and diffusers are the reference forward pass of the UNet importer test.
    # pytest-xdist: the suite runs as two workers (`-n 2`), one per core of the CI machine.
    "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
             "torch==2.13.0", "diffusers==0.42.1"],
    "notebooks": ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
}

setuptools.setup(
    name="ddpm_ot_jax",
    version="0.1.0",
    description="DDPM encoders vs optimal transport, and the DPM-OT sampler, in JAX.",
    packages=setuptools.find_packages(include=["ddpm_ot_jax", "ddpm_ot_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
