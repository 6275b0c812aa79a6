#!/usr/bin/env bash
# The tools the Python package is built and tested with, on a machine with only Python and pip:
# maturin, NumPy and pytest, installed once with `pip install --target` (no virtual environment
# needed) into a cache folder (default .ci-cache/py-tools-<python version>, git-ignored;
# override with SYMMCOMM_PY_TOOLS).
#
# Source it:   source scripts/py-env.sh
# It exports SYMMCOMM_PY (the interpreter: $PYTHON, default python3) and puts the tools on
# PYTHONPATH and PATH. The first time it needs network access to PyPI.

_symmcomm_py_env() {
    local python="${PYTHON:-python3}"
    local pins="maturin==1.16.0 numpy==2.4.6 pytest==9.0.3"
    local root version dir tmp stamp

    if ! command -v "${python}" > /dev/null 2>&1; then
        echo "py-env: ${python} not found; install Python 3.9 or later with pip" >&2
        return 1
    fi
    version="$("${python}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || return 1
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    dir="${SYMMCOMM_PY_TOOLS:-${root}/.ci-cache/py-tools-${version}}"
    stamp="${dir}/.installed-$(echo "${pins}" | tr ' =' '_-')"
    if [ ! -f "${stamp}" ]; then
        tmp="${dir}.tmp.$$"
        rm -rf "${tmp}"
        # shellcheck disable=SC2086 # the pins are words
        if ! PIP_ROOT_USER_ACTION=ignore "${python}" -m pip install --quiet --disable-pip-version-check \
            --target "${tmp}" ${pins} >&2; then
            rm -rf "${tmp}"
            echo "py-env: pip could not install ${pins}" >&2
            return 1
        fi
        touch "${tmp}/.installed-$(echo "${pins}" | tr ' =' '_-')"
        rm -rf "${dir}"
        mv "${tmp}" "${dir}" || return 1
    fi
    export SYMMCOMM_PY="${python}"
    case ":${PYTHONPATH:-}:" in
        *":${dir}:"*) ;;
        *) export PYTHONPATH="${dir}${PYTHONPATH:+:${PYTHONPATH}}" ;;
    esac
    case ":${PATH}:" in
        *":${dir}/bin:"*) ;;
        *) export PATH="${dir}/bin:${PATH}" ;;
    esac
    echo "py-env: Python ${version} (${python}) with ${pins} from ${dir}" >&2
}

_symmcomm_py_env
_symmcomm_py_env_rc=$?
unset -f _symmcomm_py_env
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    eval "unset _symmcomm_py_env_rc; return ${_symmcomm_py_env_rc}"
else
    exit "${_symmcomm_py_env_rc}"
fi
