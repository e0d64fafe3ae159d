from setuptools import find_packages, setup

setup(
    name="spjax",
    version="0.1.0",
    description="Declarative-layout language-model training on TPU meshes with JAX and Flax NNX",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["spjax", "spjax.*"]),
    package_data={"spjax.data": ["*.model"]},
    # Lower bounds are the versions the suite passes on: Python 3.11 with jax 0.10.2 / flax 0.12.8,
    # and Python 3.12 with the newest the index gives it, jax 0.12.1 / flax 0.12.12 (.ci/run).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.0",
        "ml-collections>=1.1.0",
        "absl-py>=2.1.0",
        "tensorboardX>=2.6.2",
        "tqdm>=4.66",
        "numpy>=2.0",
        "tensorflow-datasets>=4.9.10",  # SlimPajama builder (array_record; TensorFlow not needed)
        "zstandard>=0.22",  # SlimPajama's .jsonl.zst
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5"],
        # HF parity tests and the decode benchmark: CPU torch (2.13.0 is the build this machine
        # kind ships on disk; a looser pin pulls a multi-GB CUDA build) and transformers.
        "hf": ["torch==2.13.0", "transformers>=5.17,<6"],
        # libtpu, the TPU compiler tools/aot_tpu.py runs on a CPU for ahead-of-time estimates.
        "tpu": ["jax[tpu]>=0.10.2"],
        # tools/plot_metrics.py, config.plot_every_eval and the experiments' charts.
        "plot": ["matplotlib>=3.11.2"],
    },
    entry_points={"console_scripts": ["spjax-train=spjax.main:run",
                                      "spjax-generate=spjax.infer.generate:run",
                                      "spjax-convert-hf=spjax.convert.export:run",
                                      "spjax-eval=spjax.infer.evaluate:run",
                                      "spjax-quantize=spjax.compress.quantize:run",
                                      "spjax-merge=spjax.compress.merge:run"]},
)
