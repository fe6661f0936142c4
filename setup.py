"""youzhi_ms: GQA -> MLA conversion (layer-adaptive FreqFold), GKD recovery and MLA deployment on MindSpore."""
from setuptools import find_packages, setup

setup(
    name="youzhi_ms",
    version="0.1.0",
    description="MindSpore-native YouZhi: convert Hugging Face GQA models to DeepSeek-style MLA",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["youzhi_ms", "youzhi_ms.*"]),
    install_requires=[
        "mindspore==2.10.0",
        "numpy>=1.25,<2",  # numpy 2 breaks mindspore 2.10 at run time
        "safetensors",
        "pyyaml",
        "sentencepiece",
        # the ranges transformers==4.57.1 (the tests' reference) requires, so that the runtime and the test install
        # resolve to the same versions whichever runs first
        "tokenizers>=0.22.0,<=0.23.0",
        "huggingface-hub>=0.34.0,<1.0",
        "tqdm",
        "jinja2",  # chat templates
        "matplotlib",  # report and benchmark plots (PNG, Agg backend)
        "gguf==0.19.0",  # the llama.cpp project's GGUF writer: tools/export_gguf.py and the pipeline's GGUF stage
    ],
    extras_require={
        # transformers (torch, CPU) is the independent reference the tests compare against;
        # gguf (a runtime dependency, above) is also the reference for our own GGUF reader;
        # llama-cpp-python is llama.cpp, the inference engine the GGUF exports are run in (no wheel on the index:
        # pip builds it from source, run_scripts/setup_env.sh sets the CMake flags that keep the build short).
        "test": ["pytest", "torch==2.13.0", "transformers==4.57.1", "llama-cpp-python==0.3.36"],
    },
)
