from setuptools import find_packages, setup

# Ranges seen working together (see README "Versions"): the GPU machines carry torch 2.11 +
# transformers 5.17, the CPU vLLM build pins transformers 5.19, the main test venv the newest.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.15",
    # qwen-vl-utils imports torchvision; it must be the build matching torch (README: torchvision trap).
    "torchvision>=0.26,<0.30",
    "transformers>=5.16,<5.25",
    "deepspeed>=0.18,<0.20",
    "submitit>=1.5,<1.6",
    "pyyaml>=6",
    "qwen-vl-utils>=0.0.11",
    "safetensors>=0.4",
    "pillow>=10",
    "tokenizers>=0.21",
    "pyarrow>=15",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "math-verify[antlr4_13_2]>=0.8,<0.10",
]

EXTRAS = {
    "gpu": ["vllm>=0.10", "flash-attn>=2.7"],
    "megatron": ["megatron-core>=0.16,<0.20"],
    "test": ["pytest>=8", "pytest-timeout>=2.3"],
    "wandb": ["wandb"],
}

setup(
    name="ovr-hpc",
    version="0.1.0",
    description="Slurm-native training of Open Vision Reasoner (OVR): linguistic cold start + multimodal RL",
    packages=find_packages(include=["ovr_hpc", "ovr_hpc.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ovr-hpc=ovr_hpc.cli:main"]},
)
