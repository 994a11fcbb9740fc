#!/usr/bin/env bash
# The bench-only environment: peer tools that mimo's benchmarks compare against, never mimo's own dependencies.
#   bash bench/setup_bench_env.sh          # makes bench/.venv: torch (CPU, as scripts/setup.sh), mimo, transformers +
#                                          # peft + trl, llama-cpp-python
# llama-cpp-python builds llama.cpp from source (about 30 minutes on 2 cores). Its AMX code is switched off (on
# some VMs that advertise AMX it dies on q4_0/q8_0: an illegal instruction, or a segmentation fault); everything
# else is native.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=bench/.venv
[ -x $ENV/bin/python ] || "$PY" -m venv $ENV
$ENV/bin/python -m pip install -q --upgrade pip
read -r -a torch_spec <<< "${MIMO_TORCH:-torch==2.13.0}"
$ENV/bin/python -m pip install -q "${torch_spec[@]}"
$ENV/bin/python -m pip install -q -e .
# transformers + PEFT (and pytest): adapters from `mimo tune` open in peft.PeftModel and PEFT's own load in mimo,
# with equal logits: bench/.venv/bin/python -m pytest -q tests/inference/test_lora.py -k opens
$ENV/bin/python -m pip install -q "${torch_spec[@]}" "transformers==5.25.0" "peft==0.21.2" pytest
# TRL's GRPOTrainer, the RL peer of bench/rl_vs_trl.py (its own generation, on the CPU)
$ENV/bin/python -m pip install -q "${torch_spec[@]}" "transformers==5.25.0" "trl==1.16.0"
# GGML_AMX_*=OFF alone does not do it on a host with AMX: -march=native turns AMX on again, and the AMX matmul
# crashed there (a segmentation fault in ggml_backend_amx_mul_mat, an Intel Xeon VM, 2026-12-06); GCC's explicit
# -mno-amx-* (CMake takes CFLAGS / CXXFLAGS as its first flags) win over -march=native in any order. A rerun
# rebuilds it.
$ENV/bin/python -m pip uninstall -q -y llama-cpp-python
CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_BLAS=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
  $ENV/bin/python -m pip install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python${LLAMA_CPP_VERSION:+==$LLAMA_CPP_VERSION}"
$ENV/bin/python -c "import llama_cpp, torch; print('bench env ready: llama-cpp-python', llama_cpp.__version__, 'torch', torch.__version__)"
