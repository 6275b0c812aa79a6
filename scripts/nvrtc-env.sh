#!/usr/bin/env bash
# Make NVRTC 13.0 and the CUDA headers available on a machine with no GPU and no CUDA toolkit,
# from NVIDIA's PyPI wheels, so that symmcomm's kernels can be compiled (CI, laptops).
#
# Source it to set up the current shell:
#     source scripts/nvrtc-env.sh
# or run it and evaluate what it prints:
#     eval "$(scripts/nvrtc-env.sh)"
#
# What it does:
#   - if SYMMCOMM_CUDA_INCLUDE already names a folder holding cuda_bf16.h, nothing;
#   - else installs nvidia-cuda-nvrtc==13.0.88 and nvidia-cuda-runtime==13.0.96 with
#     `pip install --no-deps --target` into a cache folder (default .ci-cache/cuda-wheels under
#     the repository root, git-ignored; override with SYMMCOMM_CUDA_WHEELS), once;
#   - exports LD_LIBRARY_PATH (the wheel's lib folder first) and SYMMCOMM_CUDA_INCLUDE.
# It prints one line (on stderr) saying what it used. Needs python3 with pip and, the first
# time, network access to PyPI.

_symmcomm_nvrtc_env() {
    local nvrtc_version="13.0.88"
    local runtime_version="13.0.96"
    local python="${PYTHON:-python3}"
    local root dir tmp lib inc

    if [ -n "${SYMMCOMM_CUDA_INCLUDE:-}" ] && [ -f "${SYMMCOMM_CUDA_INCLUDE}/cuda_bf16.h" ]; then
        echo "nvrtc-env: SYMMCOMM_CUDA_INCLUDE=${SYMMCOMM_CUDA_INCLUDE} is already set; nothing to do" >&2
        return 0
    fi

    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    dir="${SYMMCOMM_CUDA_WHEELS:-${root}/.ci-cache/cuda-wheels}"

    # Installed already? The dist-info folders name the exact versions.
    if [ ! -d "${dir}/nvidia_cuda_nvrtc-${nvrtc_version}.dist-info" ] ||
        [ ! -d "${dir}/nvidia_cuda_runtime-${runtime_version}.dist-info" ]; then
        if ! command -v "${python}" > /dev/null 2>&1; then
            echo "nvrtc-env: ${python} not found; install Python 3 with pip" >&2
            return 1
        fi
        mkdir -p "$(dirname "${dir}")" || return 1
        # Install next to the target and rename, so an interrupted install leaves nothing
        # that looks complete.
        tmp="${dir}.tmp.$$"
        rm -rf "${tmp}"
        if ! PIP_ROOT_USER_ACTION=ignore "${python}" -m pip install --quiet --no-deps --disable-pip-version-check \
            --target "${tmp}" \
            "nvidia-cuda-nvrtc==${nvrtc_version}" "nvidia-cuda-runtime==${runtime_version}" >&2; then
            rm -rf "${tmp}"
            echo "nvrtc-env: pip could not install the NVRTC/CUDA runtime wheels" >&2
            return 1
        fi
        rm -rf "${dir}"
        mv "${tmp}" "${dir}" || return 1
    fi

    # The wheels put everything under nvidia/cu13/{lib,include}; find the files rather than
    # trust the layout.
    lib="$(find "${dir}" -name 'libnvrtc.so.13' -path '*/lib/*' -print -quit 2> /dev/null)"
    lib="${lib%/*}"
    inc="$(find "${dir}" -name 'cuda_bf16.h' -path '*/include/*' -print -quit 2> /dev/null)"
    inc="${inc%/*}"
    if [ -z "${lib}" ] || [ ! -f "${lib}/libnvrtc.so.13" ] ||
        [ ! -f "${lib}/libnvrtc-builtins.so.13.0" ]; then
        echo "nvrtc-env: libnvrtc.so.13 or libnvrtc-builtins.so.13.0 missing under ${dir}; delete it and retry" >&2
        return 1
    fi
    if [ -z "${inc}" ]; then
        echo "nvrtc-env: cuda_bf16.h missing under ${dir}; delete it and retry" >&2
        return 1
    fi

    case ":${LD_LIBRARY_PATH:-}:" in
        *":${lib}:"*) ;;
        *) export LD_LIBRARY_PATH="${lib}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}" ;;
    esac
    export SYMMCOMM_CUDA_INCLUDE="${inc}"
    echo "nvrtc-env: NVRTC ${nvrtc_version} from ${lib}, CUDA headers from ${inc}" >&2
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: set up this shell; never exit it.
    _symmcomm_nvrtc_env
    _symmcomm_nvrtc_env_rc=$?
    unset -f _symmcomm_nvrtc_env
    eval "unset _symmcomm_nvrtc_env_rc; return ${_symmcomm_nvrtc_env_rc}"
else
    # Run: print the exports for `eval`.
    _symmcomm_nvrtc_env || exit 1
    printf 'export LD_LIBRARY_PATH=%q\n' "${LD_LIBRARY_PATH}"
    printf 'export SYMMCOMM_CUDA_INCLUDE=%q\n' "${SYMMCOMM_CUDA_INCLUDE}"
fi
