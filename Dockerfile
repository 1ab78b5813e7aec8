FROM python:3.11-slim
WORKDIR /app
ENV HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAG_DATA_DIR=/app/data
COPY pyproject.toml README.md ./
COPY rag rag
COPY ingest ingest
COPY eval eval
COPY prompts prompts
RUN pip install --no-cache-dir .
EXPOSE 8000
CMD ["python", "-m", "rag", "serve"]
