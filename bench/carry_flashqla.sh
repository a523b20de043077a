#!/usr/bin/env bash
# Packs FlashQLA (QwenLM's TileLang GDN kernels) and its compiled dependencies into .whl/flashqla-site.tar.xz for
# the device machine, which has no network: bench/kernels.py times it as a second anchor beside FLA.
# The wheels come to ~78 MB against the device tool's 64 MiB carry limit, so they are installed here and packed
# without TileLang's AMD kernel headers and z3's command-line tool (neither is used on an NVIDIA GPU): ~31 MB.
# On the device:  mkdir -p /tmp/qla && tar -xJf .whl/flashqla-site.tar.xz -C /tmp/qla  and add /tmp/qla to
# PYTHONPATH (TileLang compiles its kernels with the machine's nvcc on first call).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_28_x86_64)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${platforms[@]}" -d "$work/wheels" \
    flash-qla==0.1.2 tilelang==0.1.9 apache-tvm-ffi==0.1.9 z3-solver==4.15.4.0 torch-c-dlpack-ext==0.1.5
"$python" -m pip install -q --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work/site/tilelang/3rdparty/composable_kernel" "$work/site/bin"
mkdir -p .whl
tar -C "$work/site" -cf - . | xz -9 -T0 > .whl/flashqla-site.tar.xz.partial
mv .whl/flashqla-site.tar.xz.partial .whl/flashqla-site.tar.xz
ls -l .whl/flashqla-site.tar.xz
