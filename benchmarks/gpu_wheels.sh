#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before benchmarks/gpu.sh: the GPU machine reaches no network, and its image has
# torch, transformers, peft, tokenizers, safetensors, numpy, pyyaml, jinja2, httpx, pytest and pyarrow but not the
# rest of what lmforge imports. Downloads those wheels (Python 3.12, manylinux x86-64) into .whl/, which the
# device tool carries (`carry: [".whl"]`); .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  gguf==0.19.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 \
  annotated-doc==0.0.7 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl
