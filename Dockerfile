# sande-dist for GPU clusters: CUDA, PyTorch, DeepSpeed, vLLM and this package. Build once, then run the
# Slurm pipeline inside it with pyxis/enroot (slurm.container_image, see README "Containers").
#   docker build -t sande-dist:latest .
#   enroot import -o sande-dist.sqsh dockerd://sande-dist:latest
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/sande-dist
COPY setup.py README.md ./
COPY sande_dist ./sande_dist
COPY ds_configs ./ds_configs
COPY slurm ./slurm
COPY configs ./configs

# The image's own CUDA torch stays (vLLM and DeepSpeed build against it); the GPU extra adds vLLM and lm-eval.
RUN pip install --no-cache-dir ".[gpu,tracking,peft]"
# flash-attn only from a prebuilt wheel that matches this torch and CUDA: never compiled here (it takes an
# hour and a GPU toolchain). Without it, attention falls back to sdpa.
RUN pip install --no-cache-dir --only-binary :all: "flash-attn>=2.6" \
    || echo "no flash-attn wheel for this torch/CUDA: sdpa is used"

ENV TOKENIZERS_PARALLELISM=false
ENTRYPOINT ["sande"]
CMD ["--help"]
